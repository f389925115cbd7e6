"""Benchmark helper: one grammar engine's cost on one tokenizer, measured in its own process.

llguidance (ours, engines/grammar.py) and, for comparison only, xgrammar, outlines-core and
lm-format-enforcer, which are not project dependencies: installed by hand outside .venv, without
their dependencies (they would pull their own torch and transformers), and appended to sys.path
after .venv's site-packages, so they can never shadow what .venv holds:

    .venv/bin/pip install --no-deps --target .bench/grammar-peers xgrammar==0.2.8 \\
        outlines-core==0.2.14 lm-format-enforcer==0.11.3 interegular==0.3.3 \\
        apache-tvm-ffi==0.1.15.post2

Run by bench/engine.py --mask [--peers]: `python -m bench.grammar_peers ENGINE TOKENIZER_DIR LABEL`
prints one JSON Row as its last line. Each engine walks MASK_DOC token by token through its own
documented "mask of the next token" API, applies the mask to a logits tensor the way its
transformers integration does, and consumes the token; the walk checks (untimed) that every
token of the document was allowed and that the end token is allowed after it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

PEERS_DIR = Path(__file__).resolve().parent.parent / ".bench" / "grammar-peers"
# Each engine's distributions: itself and what it needs that .venv lacks (its install size).
DISTS = {
    "llguidance": ("llguidance",),
    "xgrammar": ("xgrammar", "apache-tvm-ffi"),
    "outlines-core": ("outlines-core",),
    "lm-format-enforcer": ("lm-format-enforcer", "interegular"),
}
WALKS = 6  # the first is reported as cold, the other five give median and p99


class Row(msgspec.Struct, kw_only=True):
    """One engine on one tokenizer: sizes in MB, build times in ms, per-token costs in us."""

    engine: str
    tokenizer: str
    vocab: int = 0
    tokens: int = 0
    size_mb: float = 0.0
    convert_ms: float = 0.0
    compile_ms: float = 0.0
    cold_us: float = 0.0
    median_us: float = 0.0
    p99_us: float = 0.0
    apply_us: float = 0.0
    advance_us: float | None = None  # None: the engine consumes the token inside its mask call
    error: str = ""


def parse_row(stdout: str, engine: str, tokenizer: str) -> Row:
    """The Row a measuring process printed last, or a Row naming why there is none."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return Row(engine=engine, tokenizer=tokenizer, error="no output")
    try:
        return msgspec.json.decode(lines[-1], type=Row)
    except msgspec.DecodeError as e:
        return Row(engine=engine, tokenizer=tokenizer, error=f"bad row: {e}: {lines[-1][:200]}")


COLUMNS = (
    ("engine", 18), ("tokenizer", 16), ("vocab", 6), ("tokens", 6), ("MB", 5), ("convert", 8),
    ("compile", 8), ("cold", 7), ("median", 7), ("p99", 7), ("apply", 6), ("advance", 7),
)  # fmt: skip
HEADER = " ".join(f"{name:>{width}}" for name, width in COLUMNS)


def format_row(row: Row) -> str:
    """One line of the table under HEADER; a failed case shows its error after its names."""
    names = f"{row.engine:>18} {row.tokenizer:>16}"
    if row.error:
        return f"{names} {row.error}"
    advance = "in mask" if row.advance_us is None else f"{row.advance_us:.1f}"
    return (
        f"{names} {row.vocab:>6} {row.tokens:>6} {row.size_mb:>5.1f} {row.convert_ms:>8.0f} "
        f"{row.compile_ms:>8.1f} {row.cold_us:>7.0f} {row.median_us:>7.0f} {row.p99_us:>7.0f} "
        f"{row.apply_us:>6.0f} {advance:>7}"
    )


def install_mb(engine: str) -> float:
    files = (f for d in DISTS[engine] for f in importlib.metadata.distribution(d).files or ())
    return sum(f.size or 0 for f in files) / 1e6


def byte_level(token: str, table: dict[str, int]) -> bytes:
    """A byte-level BPE token's bytes (GPT-2's byte-to-character table reversed)."""
    if all(ch in table for ch in token):
        return bytes(table[ch] for ch in token)
    return token.encode()


def byte_table() -> dict[str, int]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable + [256 + n for n in range(256 - len(printable))]
    rest = [b for b in range(256) if b not in printable]
    return {chr(c): b for c, b in zip(chars, printable + rest, strict=True)}


class Llguidance:
    def __init__(self) -> None:  # imports here: not part of any timed step
        from services.worker.engines import grammar, hf

        self.grammar, self.constrain = grammar, hf.constrain

    def convert(self, tok: Any) -> None:
        self.grammars = self.grammar.Grammars(self.grammar.hf_tokenizer(tok))

    def compile(self, schema: dict[str, Any]) -> None:
        self.c = self.grammar.json_schema(schema)
        self.grammars.guide(self.c)

    def start(self) -> None:
        self.guide = self.grammars.guide(self.c)  # from the compile cache, as a later request

    def mask(self) -> Any:
        return self.guide.allowed()

    def apply(self, logits: Any, mask: Any) -> Any:
        return self.constrain(logits[0], mask)

    def allows(self, mask: Any, token: int) -> bool:
        return bool(mask[token])

    def advance(self, token: int) -> bool:
        return self.guide.advance(token)


class XGrammar:
    def __init__(self) -> None:
        self.xgr: Any = importlib.import_module("xgrammar")

    def convert(self, tok: Any) -> None:
        info = self.xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.compiler = self.xgr.GrammarCompiler(info)  # default: 8 threads, cache on
        self.bitmask = self.xgr.allocate_token_bitmask(1, len(tok))

    def compile(self, schema: dict[str, Any]) -> None:
        self.compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def start(self) -> None:
        self.matcher = self.xgr.GrammarMatcher(self.compiled)

    def mask(self) -> Any:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask

    def apply(self, logits: Any, mask: Any) -> Any:
        self.xgr.apply_token_bitmask_inplace(logits, mask)
        return logits

    def allows(self, mask: Any, token: int) -> bool:
        return bool((int(mask[0, token >> 5]) >> (token & 31)) & 1)

    def advance(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))


class OutlinesCore:
    def __init__(self) -> None:
        self.oc: Any = importlib.import_module("outlines_core")
        self.kernels: Any = importlib.import_module("outlines_core.kernels.torch")

    def convert(self, tok: Any) -> None:
        table, special = byte_table(), set(tok.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i not in special:
                tokens.setdefault(byte_level(text, table), []).append(i)
        self.vocabulary = self.oc.Vocabulary(tok.eos_token_id, tokens)
        self.bitmask = self.kernels.allocate_token_bitmask(len(tok))

    def compile(self, schema: dict[str, Any]) -> None:
        regex = self.oc.json_schema.build_regex_from_schema(
            json.dumps(schema), whitespace_pattern=""
        )
        self.index = self.oc.Index(regex, self.vocabulary)

    def start(self) -> None:
        self.guide = self.oc.Guide(self.index)

    def mask(self) -> Any:
        self.kernels.fill_next_token_bitmask(self.guide, self.bitmask)
        return self.bitmask

    def apply(self, logits: Any, mask: Any) -> Any:
        self.kernels.apply_token_bitmask_inplace(logits, mask)  # torch.compile'd: cold in walk 1
        return logits

    allows = XGrammar.allows  # the same 32-bit words

    def advance(self, token: int) -> bool:
        self.guide.advance(token, return_tokens=False)
        return True  # advance raises on a token its state does not allow


class LmFormatEnforcer:
    def __init__(self) -> None:
        self.lmfe: Any = importlib.import_module("lmformatenforcer")

    def convert(self, tok: Any) -> None:
        # lmfe.integrations.transformers does not import with transformers 5 (it imports
        # PreTrainedTokenizerBase from transformers.tokenization_utils): its
        # build_token_enforcer_tokenizer_data, inlined, through lmfe's core API.
        zero, special = tok.encode("0")[-1], set(tok.all_special_ids)
        regular = []
        for i in range(len(tok)):
            if i not in special:
                after_zero, alone = tok.decode([zero, i])[1:], tok.decode([i])
                regular.append((i, after_zero, len(after_zero) > len(alone)))

        def decode(ids: list[int]) -> str:
            return str(tok.decode(ids)).rstrip("\ufffd")

        self.data = self.lmfe.TokenEnforcerTokenizerData(
            regular, decode, tok.eos_token_id, False, len(tok)
        )

    def compile(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.start()

    def start(self) -> None:
        parser = self.lmfe.JsonSchemaParser(self.schema)
        self.enforcer = self.lmfe.TokenEnforcer(self.data, parser)
        self.sequence: list[int] = []

    def mask(self) -> Any:
        return self.enforcer.get_allowed_tokens(self.sequence).allowed_tokens

    def apply(self, logits: Any, mask: Any) -> Any:
        import torch  # as transformers' PrefixConstrainedLogitsProcessor, lmfe's integration

        bias = torch.full_like(logits, float("-inf"))
        bias[0, mask] = 0
        return logits + bias

    def allows(self, mask: Any, token: int) -> bool:
        return token in mask

    def advance(self, token: int) -> bool:
        self.sequence.append(token)  # consumed by the next get_allowed_tokens
        return True


ENGINES: dict[str, Callable[[], Any]] = {
    "llguidance": Llguidance,
    "xgrammar": XGrammar,
    "outlines-core": OutlinesCore,
    "lm-format-enforcer": LmFormatEnforcer,
}


def walk(engine: Any, ids: list[int], eos: int, logits: Any) -> tuple[list[float], ...]:
    """One request: a fresh state, then per token mask, apply, advance (seconds each)."""
    engine.start()
    masks, applies, advances = list[float](), list[float](), list[float]()
    for t in ids:
        t0 = time.perf_counter()
        mask = engine.mask()
        t1 = time.perf_counter()
        engine.apply(logits, mask)
        t2 = time.perf_counter()
        ok = engine.advance(t)
        t3 = time.perf_counter()
        if not ok or not engine.allows(mask, t):
            raise AssertionError(f"token {t} refused after {len(masks)} tokens")
        masks.append(t1 - t0)
        applies.append(t2 - t1)
        advances.append(t3 - t2)
    if not engine.allows(engine.mask(), eos):
        raise AssertionError("the end token is not allowed after the whole document")
    return masks, applies, advances


def measure(name: str, tok: Any, label: str, schema: dict[str, Any], doc: str) -> Row:
    import torch

    row = Row(engine=name, tokenizer=label, vocab=len(tok), size_mb=install_mb(name))
    engine = ENGINES[name]()
    began = time.perf_counter()
    engine.convert(tok)
    row.convert_ms = (time.perf_counter() - began) * 1e3
    began = time.perf_counter()
    engine.compile(schema)
    row.compile_ms = (time.perf_counter() - began) * 1e3
    ids = tok.encode(doc, add_special_tokens=False)
    row.tokens = len(ids)
    logits = torch.zeros(1, len(tok))
    cold = walk(engine, ids, tok.eos_token_id, logits)[0]
    runs = [walk(engine, ids, tok.eos_token_id, logits) for _ in range(WALKS - 1)]
    masks, applies, advances = ([x for run in runs for x in run[k]] for k in range(3))
    row.cold_us = statistics.mean(cold) * 1e6
    row.median_us = statistics.median(masks) * 1e6
    row.p99_us = sorted(masks)[int(len(masks) * 0.99)] * 1e6
    row.apply_us = statistics.median(applies) * 1e6
    if name != "lm-format-enforcer":
        row.advance_us = statistics.median(advances) * 1e6
    return row


def main(name: str, tokenizer_dir: str, label: str) -> None:
    sys.path.append(str(PEERS_DIR))  # after site-packages: .venv's packages win
    from transformers import AutoTokenizer

    from bench.engine import MASK_DOC, MASK_SCHEMA

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    try:
        row = measure(name, tok, label, MASK_SCHEMA, MASK_DOC)
    except Exception as e:
        row = Row(engine=name, tokenizer=label, error=f"{type(e).__name__}: {e}"[:300])
    print(msgspec.json.encode(row).decode())


if __name__ == "__main__":
    main(*sys.argv[1:4])
