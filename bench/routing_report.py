"""The routing benchmark's report: a markdown table per workload, a PNG of TTFT distributions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import Summary
from bench.workloads import Workload

COLUMNS = (
    "target", "sent", "completed", "refused", "errors", "p50 TTFT s", "p99 TTFT s", "p99 e2e s",
    "mean ITL ms", "goodput r/s", "completed r/s", "goodput ÷ best peer", "p99 TTFT ÷ best peer",
    "fast share", "prefix hit",
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One target's run of one workload; summary None when it could not run (note says why)."""

    target: str
    summary: Summary | None
    note: str = ""  # why it did not run, or how long its phases took
    fast_share: float | None = None  # the fast workers' share of the tokens generated
    hit_rate: float | None = None  # prefix-cache hits / lookups, where the workers report them
    ttfts: Sequence[float] = field(default_factory=tuple)
    sent: int = 0

    def brief(self) -> str:
        s = self.summary
        if s is None:
            return self.note
        p99 = fmt(s.p99_ttft_s)
        errors = f", first error: {s.first_error}" if s.first_error else ""
        return (
            f"{s.completed}/{s.sent} completed, {s.refused} refused, {s.errors} errors,"
            f" p99 TTFT {p99} s, goodput {s.goodput_rps:.1f}/s [{self.note}]{errors}"
        )


def fmt(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def ratio(value: float | None, best: float | None) -> str:
    return "n/a" if value is None or not best else f"{value / best:.2f}x"


def best_peer(rows: Sequence[Row], peer_kinds: Sequence[str]) -> tuple[float | None, float | None]:
    """The best goodput and the lowest p99 TTFT of any peer policy (each may be another peer)."""
    done = [
        r.summary
        for r in rows
        if r.summary is not None and r.summary.completed and r.target.split(":")[0] in peer_kinds
    ]
    goodput = max((s.goodput_rps for s in done), default=None)
    p99s = [s.p99_ttft_s for s in done if s.p99_ttft_s is not None]
    return goodput, min(p99s, default=None)


def table(workload: Workload, rows: Sequence[Row], peer_kinds: Sequence[str]) -> str:
    best_goodput, best_p99 = best_peer(rows, peer_kinds)
    lines = [
        f"### ({workload.name}) {workload.title}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c == "target" else "---:" for c in COLUMNS) + "|",
    ]
    for row in rows:
        s = row.summary
        if s is None:
            lines.append(f"| {row.target} | {row.note} |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = [
            row.target, str(s.sent), str(s.completed), str(s.refused), str(s.errors),
            fmt(s.p50_ttft_s), fmt(s.p99_ttft_s), fmt(s.p99_e2e_s), fmt(s.mean_itl_s, 1, 1000),
            f"{s.goodput_rps:.1f}", f"{s.throughput_rps:.1f}",
            ratio(s.goodput_rps, best_goodput), ratio(s.p99_ttft_s, best_p99),
            fmt(row.fast_share, 0, 100) + ("%" if row.fast_share is not None else ""),
            fmt(row.hit_rate, 0, 100) + ("%" if row.hit_rate is not None else ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_png(
    path: Path, results: dict[str, list[Row]], workloads: Sequence[Workload], slo_ttft_s: float
) -> None:
    """One panel per workload: per target, the share of sent requests with TTFT <= x (a refused
    or failed request never arrives, so a curve tops out at the share completed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: matplotlib is missing (it is in the dev extra: requirements/dev.txt)")
        return
    shown = [w for w in workloads if w.name in results]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], shown, strict=True):
        for row in results[workload.name]:
            if not row.ttfts or not row.sent:
                continue
            xs = sorted(row.ttfts)
            ys = [(i + 1) / row.sent for i in range(len(xs))]
            style = "-" if row.target.startswith("switchboard") else "--"
            ax.step(xs, ys, where="post", linestyle=style, label=row.target)
        ax.axvline(slo_ttft_s, color="grey", linewidth=0.8, linestyle=":", label="TTFT SLO")
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s, log)")
        ax.set_ylabel("share of sent requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"({workload.name}) {workload.title}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
