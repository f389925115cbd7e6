"""Benchmark: tokens/s of the worker's engine vs. the raw library loop, at 1, 4 and 16 streams;
with --mask, what structured output's grammar mask costs per token.

Run: .venv/bin/python bench/engine.py [--engine auto|transformers|exllamav2] [--model-dir DIR]
Without --model-dir it builds the demo checkpoint in a temp dir. auto = exllamav2 on CUDA, else
transformers on CPU. Raw loop: transformers' generate() once per stream (batch 1, as the engine),
or exllamav2's dynamic generator driven directly. Ratio = engine / raw (1.0 = no overhead).

--mask [--vocab N ...] [--peers]: llguidance (engines/grammar.py) walking a JSON document of a
schema token by token, over the demo checkpoint's tokenizer (or --model-dir's) and byte-level BPE
tokenizers of up to N tokens trained here on the standard library's sources (no download): per
token the mask (compute), its application to a logits tensor (hf.constrain) and the advance; plus
the tokenizer's conversion and the schema's first compile (later requests hit the cache). --peers:
xgrammar, outlines-core and lm-format-enforcer side by side, from .bench/grammar-peers (not
project dependencies; bench/grammar_peers.py says how to install them). Each engine on each
tokenizer runs in its own process, stopped after --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas.inference import ChatMessage
from services.worker.engines.base import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
# What the peers' own dependencies would bring along: never from .bench/grammar-peers.
SHADOWED = {"torch", "transformers", "tokenizers", "numpy", "pydantic", "triton", "llguidance"}
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


def run_case(engine: str, tokenizer_dir: Path, label: str, timeout: float) -> Any:
    """One engine on one tokenizer, in its own process (bench/grammar_peers.py): a Row."""
    from bench.grammar_peers import Row, parse_row

    command = [sys.executable, "-m", "bench.grammar_peers", engine, str(tokenizer_dir), label]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return Row(engine=engine, tokenizer=label, error=f"over {timeout:.0f} s (stopped)")
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        return Row(engine=engine, tokenizer=label, error=f"exit {done.returncode}: {tail}")
    return parse_row(done.stdout, engine, label)


def mask_bench(model_dir: Path | None, vocabs: list[int], peers: bool, timeout: float) -> None:
    if str(ROOT) not in sys.path:  # run as bench/engine.py: the bench package is beside it
        sys.path.insert(0, str(ROOT))
    from bench.grammar_peers import DISTS, HEADER, PEERS_DIR, format_row
    from services.worker.engines.demo_model import make_demo_model

    engines = list(DISTS) if peers else ["llguidance"]
    if peers and not PEERS_DIR.is_dir():
        raise SystemExit(f"{PEERS_DIR} is missing: see bench/grammar_peers.py to install it")
    shadowing = [p.name for p in PEERS_DIR.glob("*") if p.name in SHADOWED] if peers else []
    if shadowing:
        raise SystemExit(f"{PEERS_DIR} holds {shadowing}: reinstall it with --no-deps")
    print(
        f"document: {len(MASK_DOC)} bytes. MB: installed (engine and what .venv lacks); convert "
        "(tokenizer info), compile (the schema's first): ms. Per token, us: mask (cold: the first "
        "walk's mean; then median and p99 of 5 more walks), apply and advance (median)"
    )
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir or make_demo_model(Path(tmp) / "demo")
        cases = [(directory.name, directory)]
        for vocab in vocabs:
            tok = stdlib_bpe(vocab)
            cases.append((f"stdlib BPE {len(tok) // 1000}k", Path(tmp) / f"bpe-{vocab}"))
            tok.save_pretrained(str(cases[-1][1]))
        for label, tokenizer_dir in cases:
            for engine in engines:
                print(format_row(run_case(engine, tokenizer_dir, label, timeout)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default="auto", choices=["auto", "transformers", "exllamav2"])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mask", action="store_true", help="the grammar mask's cost per token")
    parser.add_argument("--vocab", type=int, nargs="*", default=[32_000, 128_000])
    parser.add_argument(
        "--peers", action="store_true", help="with --mask: xgrammar, outlines-core, lmfe too"
    )
    parser.add_argument("--timeout", type=float, default=300, help="--mask: s per engine/vocab")
    args = parser.parse_args()
    if args.mask:
        mask_bench(args.model_dir, args.vocab, args.peers, args.timeout)
    else:
        asyncio.run(main(args.engine, args.model_dir, args.tokens))
