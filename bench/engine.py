"""Benchmark: tokens/s of the worker's engine vs. the raw library loop, at 1, 4 and 16 streams;
with --mask, what structured output's grammar mask costs per token.

Run: .venv/bin/python bench/engine.py [--engine auto|transformers|exllamav2] [--model-dir DIR]
Without --model-dir it builds the demo checkpoint in a temp dir. auto = exllamav2 on CUDA, else
transformers on CPU. Raw loop: transformers' generate() once per stream (batch 1, as the engine),
or exllamav2's dynamic generator driven directly. Ratio = engine / raw (1.0 = no overhead).

--mask [--vocab N ...]: llguidance (engines/grammar.py) walking a JSON document of a schema token
by token, over the demo checkpoint's tokenizer (or --model-dir's) and byte-level BPE tokenizers of
N tokens trained here on the standard library's sources (no download): per token the mask
(compute), its application to a logits tensor (hf.constrain) and the consume; plus the tokenizer's
conversion and the schema's first compile (later requests hit the cache).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas.inference import ChatMessage
from services.worker.engines.base import SamplingParams

PROMPT = [ChatMessage(role="user", content="Route this request to the least busy worker.")]


async def engine_rate(engine: Any, prompt: str, streams: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0)

    async def one() -> int:
        return sum([c.tokens async for c in engine.start(prompt, params)])

    began = time.perf_counter()
    total = sum(await asyncio.gather(*(one() for _ in range(streams))))
    return total / (time.perf_counter() - began)


def raw_hf_rate(engine: Any, prompt: str, streams: int, tokens: int) -> float:
    import torch

    ids = torch.tensor([engine._encode(prompt)])
    began = time.perf_counter()
    total = 0
    with torch.inference_mode():
        for _ in range(streams):
            out = engine._model.generate(
                ids,
                max_new_tokens=tokens,
                do_sample=False,
                min_new_tokens=tokens,
                pad_token_id=engine._tokenizer.eos_token_id,
            )
            total += out.shape[-1] - ids.shape[-1]
    return total / (time.perf_counter() - began)


def raw_exl2_rate(engine: Any, prompt: str, streams: int, tokens: int) -> float:
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    gen = engine.generator
    ids = engine._encode(prompt)
    began = time.perf_counter()
    for i in range(streams):
        gen.enqueue(
            ExLlamaV2DynamicJob(
                input_ids=ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                identifier=i,
                stop_conditions=[engine.tokenizer.eos_token_id],
            )
        )
    total = 0
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r.get("stage") == "streaming" and r.get("eos"):
                total += int(r["new_tokens"])
    return total / (time.perf_counter() - began)


async def main(kind: str, model_dir: Path | None, tokens: int) -> None:
    from services.worker.engines.demo_model import make_demo_model
    from services.worker.engines.exl2 import cuda_ready

    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir or make_demo_model(Path(tmp) / "demo")
        if kind == "auto":
            kind = "exllamav2" if cuda_ready()[0] else "transformers"
        if kind == "exllamav2":
            from services.worker.engines.exl2 import ExLlamaV2Engine

            engine: Any = ExLlamaV2Engine(directory, "bench", max_batch=16)
            raw = raw_exl2_rate
        else:
            from services.worker.engines.hf import TransformersEngine

            engine = TransformersEngine(directory, "bench")
            raw = raw_hf_rate
        await engine.load()
        prompt = engine.chat_prompt(PROMPT)
        extra = f", paged={engine.paged}" if kind == "exllamav2" else ""
        print(
            f"engine={kind} model={directory.name} max_batch={engine.limits.max_batch}{extra} "
            f"tokens/stream={tokens}"
        )
        for streams in (1, 4, 16):  # warm-up: first-use kernel and allocator costs are not overhead
            await engine_rate(engine, prompt, streams, tokens)
            await measure_raw(kind, raw, engine, prompt, streams, tokens)
        print(f"{'streams':>7} {'engine tok/s':>13} {'raw tok/s':>10} {'ratio':>6}")
        for streams in (1, 4, 16):
            ours = await engine_rate(engine, prompt, streams, tokens)
            raw_rate = await measure_raw(kind, raw, engine, prompt, streams, tokens)
            print(f"{streams:>7} {ours:>13.0f} {raw_rate:>10.0f} {ours / raw_rate:>6.2f}")
        await engine.close()


async def measure_raw(
    kind: str, raw: Any, engine: Any, prompt: str, streams: int, tokens: int
) -> float:
    if kind == "exllamav2":
        # Driven on this thread: the engine thread is idle between runs (no live jobs), so it
        # does not touch the generator meanwhile.
        return float(raw(engine, prompt, streams, tokens))
    return float(await asyncio.to_thread(raw, engine, prompt, streams, tokens))


MASK_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{4}$"},
        "title": {"type": "string", "maxLength": 200},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "score": {"type": "number"},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "admin": {"type": "boolean"}},
            "required": ["name", "admin"],
        },
    },
    "required": ["id", "title", "tags", "score", "owner"],
    "additionalProperties": False,
}
MASK_DOC = (
    '{"id":"abc-1234","title":"Route each request to the least busy worker, refuse honestly '
    'when the fleet is full","tags":["router","worker","capacity","backpressure"],'
    '"score":0.875,"owner":{"name":"Ada Lovelace","admin":true}}'
)


def stdlib_bpe(vocab: int) -> Any:
    """A byte-level BPE tokenizer of about `vocab` tokens trained on this Python's own sources."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (f.read_text(errors="ignore") for f in files[:3000])
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def mask_costs(hf_tok: Any, label: str) -> None:
    import statistics

    import torch

    from services.worker.engines import grammar
    from services.worker.engines.hf import constrain

    began = time.perf_counter()
    llt = grammar.hf_tokenizer(hf_tok)
    convert_s = time.perf_counter() - began
    c = grammar.json_schema(MASK_SCHEMA)
    grammars = grammar.Grammars(llt)
    began = time.perf_counter()
    grammars.guide(c)
    compile_s = time.perf_counter() - began
    ids = hf_tok.encode(MASK_DOC, add_special_tokens=False)
    logits = torch.zeros(llt.vocab_size)
    masks, applies, consumes, cold = list[float](), list[float](), list[float](), 0.0
    for walk in range(6):  # the first walk builds llguidance's lexer states: reported as cold
        guide = grammars.guide(c)
        if walk == 1:
            cold = sum(masks) / len(masks)
            masks, applies, consumes = list[float](), list[float](), list[float]()
        for t in ids:
            t0 = time.perf_counter()
            allowed = guide.allowed()
            t1 = time.perf_counter()
            constrain(logits, allowed)
            t2 = time.perf_counter()
            assert guide.advance(t), guide.error
            t3 = time.perf_counter()
            masks.append(t1 - t0)
            applies.append(t2 - t1)
            consumes.append(t3 - t2)
    us = 1e6
    p99 = sorted(masks)[int(len(masks) * 0.99)]
    print(
        f"{label:>16} {llt.vocab_size:>6} {len(ids):>6} {convert_s * 1e3:>8.0f} "
        f"{compile_s * 1e3:>8.1f} {cold * us:>6.0f} {statistics.median(masks) * us:>6.0f} "
        f"{statistics.mean(masks) * us:>6.0f} {p99 * us:>6.0f} "
        f"{statistics.median(applies) * us:>6.0f} {statistics.median(consumes) * us:>7.0f}"
    )


def mask_bench(model_dir: Path | None, vocabs: list[int]) -> None:
    from transformers import AutoTokenizer

    from services.worker.engines.demo_model import make_demo_model

    print(
        f"document: {len(MASK_DOC)} bytes. convert, compile: ms. Per token, us: mask (cold: the "
        "first walk's mean; then median, mean, p99 of 5 more walks), apply and consume (median)"
    )
    cols = ("tokenizer", "vocab", "tokens", "convert", "compile", "cold", "median", "mean")
    print(
        f"{cols[0]:>16} {cols[1]:>6} {cols[2]:>6} {cols[3]:>8} {cols[4]:>8} {cols[5]:>6} "
        f"{cols[6]:>6} {cols[7]:>6} {'p99':>6} {'apply':>6} {'consume':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir or make_demo_model(Path(tmp) / "demo")
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        mask_costs(tok, directory.name)
    for vocab in vocabs:
        mask_costs(stdlib_bpe(vocab), f"stdlib BPE {vocab // 1000}k")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default="auto", choices=["auto", "transformers", "exllamav2"])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mask", action="store_true", help="the grammar mask's cost per token")
    parser.add_argument("--vocab", type=int, nargs="*", default=[32_000, 128_000])
    args = parser.parse_args()
    if args.mask:
        mask_bench(args.model_dir, args.vocab)
    else:
        asyncio.run(main(args.engine, args.model_dir, args.tokens))
