"""Microbenchmark of one replica choice: µs per choose / best_estimate / serves, before and after.

    .venv/bin/python bench/choice.py

"before" is the committed services/router (git archive HEAD, extracted to a temp dir), "after"
the working tree; each is measured in a child process whose import path is that tree, so both
are in one run. Fleets: N workers, worker i serving model m{i % M}, fresh heartbeats with a
random load (4 slots, 8 queue places, measured 1 s / 5000 tok/s), every worker holding 200
blocks of other prompts; "prefix": a 64-block prompt whose first 16 blocks 3 of m0's workers
hold. "fits": choose as the gateway's Placement.fits asks (need_room, a budget). Rows marked
"hetero" give every worker its own measured rates (as real workers report them: the columns,
vector.py, choose then), "mixed" leave every 10th of those unmeasured (its rates: its peers'
mean). "heartbeat": µs per heartbeat applied (a new load for one worker, round the fleet), after
the choices above were asked (so the columns, where used, are kept in step).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(2, 1), (2, 10), (100, 1), (100, 10), (1000, 1), (1000, 10)]
NOW = 1000.0


def model_load(i: int, models: int, kind: str, busy: int) -> Any:
    from schemas.load import ModelLoad

    hetero = kind != "same"
    unmeasured = kind == "mixed" and i % 10 == 0
    return ModelLoad(
        id=f"m{i % models}",
        in_flight=min(busy, 4),
        queue_depth=max(busy - 4, 0),
        max_in_flight=4,
        max_queue_depth=8,
        service_s=None if unmeasured else 1.0 + (i * 0.001 if hetero else 0.0),
        prefill_tokens_per_s=None if unmeasured else 5000.0 + (i if hetero else 0),
    )


def fleet(n: int, models: int, kind: str, seed: int = 1) -> Any:
    from schemas.kv import KvBlocks
    from schemas.load import WorkerLoad
    from schemas.registry import WorkerRecord, WorkerStatus
    from services.router.core import FleetView

    rng = random.Random(seed)
    view = FleetView("cost", draw=rng.random)
    ids = [f"w{i:04d}" for i in range(n)]
    view.set_records(
        {
            w: WorkerRecord(
                id=w,
                url=f"http://{w}:1",
                models=(f"m{i % models}",),
                status=WorkerStatus.READY,
                revision=1,
            )
            for i, w in enumerate(ids)
        }
    )
    for i, w in enumerate(ids):
        load = model_load(i, models, kind, rng.randint(0, 10))
        beat = WorkerLoad(
            worker_id=w, url=f"http://{w}:1", status=WorkerStatus.READY, models=(load,)
        )
        view.heartbeat(w, 1, 1, beat, NOW)
        other = tuple(rng.getrandbits(62) for _ in range(200))
        view.caches.apply(
            1, 1, KvBlocks(worker_id=w, model=f"m{i % models}", stored=other, full=True)
        )
    prompt_blocks = tuple(range(1, 65))
    for w in [ids[i] for i in range(0, n, models)][:3]:
        view.caches.apply(1, 2, KvBlocks(worker_id=w, model="m0", stored=prompt_blocks[:16]))
    return view, prompt_blocks


def per_call_us(fn: Any, budget_s: float = 0.02) -> float:
    """Mean µs per call over at least budget_s of calls (short: the dev box is shared)."""
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            fn()
        calls += 10
        spent = time.perf_counter() - start
        if spent >= budget_s:
            return spent / calls * 1e6


def row(view: Any, prompt: Any) -> dict[str, Any]:
    return {
        "choose": per_call_us(lambda: view.choose("m0", NOW, prompt=prompt)),
        "fits": per_call_us(
            lambda: view.choose("m0", NOW, need_room=True, prompt=prompt, budget_s=10.0)
        ),
        "best_estimate": per_call_us(lambda: view.best_estimate("m0", NOW, prompt)),
        "serves": per_call_us(lambda: view.serves("m0")),
    }


def heartbeat_us(view: Any, n: int, models: int, kind: str) -> float:
    """µs per heartbeat applied: each worker in turn reports a new load (seq increasing)."""
    from schemas.load import WorkerLoad
    from schemas.registry import WorkerStatus

    rng = random.Random(2)
    beats = [
        (
            f"w{i:04d}",
            WorkerLoad(
                worker_id=f"w{i:04d}",
                url=f"http://w{i:04d}:1",
                status=WorkerStatus.READY,
                models=(model_load(i, models, kind, rng.randint(0, 10)),),
            ),
        )
        for i in range(n)
    ]
    seq = iter(range(2, 1 << 40))

    def one() -> None:
        s = next(seq)
        worker_id, load = beats[s % n]
        view.heartbeat(worker_id, 1, s, load, NOW)

    return per_call_us(one)


def measure() -> list[dict[str, Any]]:
    from services.router.policy import Prompt

    rows = []
    shapes = [(s, "same") for s in SIZES] + [
        ((1000, 1), "hetero"),
        ((1000, 10), "hetero"),
        ((1000, 1), "mixed"),
    ]
    for (n, models), kind in shapes:
        view, blocks = fleet(n, models, kind)
        for prefix in (False, True):
            prompt = Prompt(tokens=4096, blocks=blocks) if prefix else Prompt(tokens=4096)
            rows.append(
                row(view, prompt) | {"workers": n, "models": models, "kind": kind, "prefix": prefix}
            )
        rows[-1]["heartbeat"] = heartbeat_us(view, n, models, kind)
    return rows


def run_in(tree: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def main() -> None:
    if "--measure" in sys.argv:
        print(json.dumps(measure()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "archive", "HEAD", "services", "schemas"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        before = run_in(Path(tmp))
    after = run_in(ROOT)
    print("µs per call, before (HEAD) → after (working tree)")
    keys = ("choose", "fits", "best_estimate", "serves", "heartbeat")
    print("| workers x models | prefix | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for old, new in zip(before, after, strict=True):
        kind = "" if new["kind"] == "same" else f" {new['kind']}"
        shape = f"{new['workers']} x {new['models']}{kind}"
        cells = [f"{old[k]:.1f} → {new[k]:.1f}" if k in new else "" for k in keys]
        print(f"| {shape} | {'yes' if new['prefix'] else 'no'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
