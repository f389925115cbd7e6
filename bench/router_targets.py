"""The router benchmark's targets: Switchboard stacks (from this tree or a `git archive` of a ref),
and the peers' routers; each a set of processes, the router ones named for CPU accounting."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.router_load import KINDS

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / ".bench" / "router-logs"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    """A running target: its base URL, its processes (stopped in reverse), the routers' pids."""

    name: str
    base: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    router_pids: list[int] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        """A process of this target, logging to LOGS/<target>/<name>.log."""
        if not self.procs:  # this run's logs only
            shutil.rmtree(log_dir(self.name), ignore_errors=True)
        log_dir(self.name).mkdir(parents=True, exist_ok=True)
        with (log_dir(self.name) / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()


def post_ok(url: str, body: bytes) -> bool:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            r.read()
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_answers(target: Target, timeout_s: float = 60, streak: int = 10) -> None:
    """Both kinds answer 200 `streak` times in a row, each on a new connection (with several
    routers on one port, every router has to know the backends)."""
    deadline, good = time.monotonic() + timeout_s, 0
    while good < streak:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name} never answered 200 at {target.base}")
        target.check_alive()
        ok = all(post_ok(target.base + p, json.dumps(b).encode()) for p, b in KINDS.values())
        good = good + 1 if ok else 0
        if not ok:
            time.sleep(0.2)


def wait_get(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200")


def export_tree(ref: str, into: Path) -> Path:
    """`git archive REF` of this repository unpacked into `into`, with the registration helper
    (which may be newer than REF) copied in."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    shutil.copy(ROOT / "bench" / "router_register.py", into / "bench" / "router_register.py")
    return into


def start_switchboard(
    name: str, backends: list[str], routers: int, tree: Path, tmp: Path
) -> Target:
    """nats-server, registry and capacity, the backends registered Ready (heartbeats off), and
    `routers` router processes on one port (SO_REUSEPORT, each 1/n of the capacity, as `up`)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),  # this tree's services, not the editable install's
        "SUBJECT_PREFIX": "bench",
        "LOG_LEVEL": "warning",
    }
    where = [sys.executable, "-c", "import services; print(services.__file__)"]
    found = subprocess.run(where, env=env, cwd=tree, capture_output=True, text=True).stdout
    if not found.startswith(str(tree)):  # an editable install ahead of PYTHONPATH would win
        raise RuntimeError(f"services import from {found.strip()!r}, not from {tree}")
    port = free_port()
    target = Target(name, f"http://127.0.0.1:{port}")
    try:
        nats_port = free_port()
        nats = Path(sys.executable).parent / "nats-server"
        binary = str(nats) if nats.exists() else shutil.which("nats-server") or "nats-server"
        store = tmp / f"js-{nats_port}"
        target.start(
            f"{name}-nats",
            [binary, "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(store)],
        )
        env["NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
        reg_port = free_port()
        py = sys.executable
        registry = target.start(
            f"{name}-registry",
            [py, "-m", "services.registry", "--http-port", str(reg_port)],
            env,
            tree,
        )
        flags = ["--http-port", str(free_port())]
        target.start(f"{name}-capacity", [py, "-m", "services.capacity", *flags], env, tree)
        wait_get(f"http://127.0.0.1:{reg_port}/healthz", registry)
        register = [py, "-m", "bench.router_register", env["NATS_URL"], "bench", *backends]
        subprocess.run(register, env=env, cwd=tree, check=True, timeout=60, capture_output=True)
        share = f"{1 / routers:.6f}"
        for i in range(routers):
            argv = [
                py,
                "-m",
                "services.router",
                "--http-port",
                str(port),
                "--capacity-share",
                share,
            ]
            target.router_pids.append(target.start(f"{name}-router-{i + 1}", argv, env, tree).pid)
        wait_answers(target, streak=10 * routers)
    except BaseException:
        target.stop()
        raise
    return target


PEER_LAUNCH = {
    "vllm-router": lambda peers: [str(peers / "bin" / "vllm-router")],
    "sglang-router": lambda peers: [
        str(peers / "bin" / "python"),
        "-m",
        "sglang_router.launch_router",
    ],
}
PEER_LOG_LEVEL = {"vllm-router": "warning", "sglang-router": "warn"}


def start_peer(name: str, peers: Path, backends: list[str]) -> Target:
    """A peer's router over the backends (round robin), its own Prometheus port (the peers
    share a default and the second one panics otherwise)."""
    port = free_port()
    target = Target(name, f"http://127.0.0.1:{port}")
    argv = [*PEER_LAUNCH[name](peers), "--worker-urls", *backends, "--port", str(port)]
    argv += ["--policy", "round_robin", "--prometheus-port", str(free_port())]
    argv += ["--log-level", PEER_LOG_LEVEL[name]]
    try:
        target.router_pids.append(target.start(name, argv).pid)
        wait_answers(target, timeout_s=90)
    except BaseException:
        target.stop()
        raise
    return target


def log_dir(target: str) -> Path:
    return LOGS / re.sub(r"[^A-Za-z0-9._@-]+", "-", target)


def log_tails(target: str, lines: int = 3) -> list[str]:
    """The last lines of each log of a target's processes (why it did not start)."""
    out = []
    for path in sorted(log_dir(target).glob("*.log")):
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
        out += [f"{path.name}: {line[:300]}" for line in tail]
    return out
