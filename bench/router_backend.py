"""The router benchmark's fixed-response backends: nginx on loopback (JSON for chat completions,
SSE for completions), its install with wrk, and the Python fallback when either is missing."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.fake_backend import ANSWER

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("wrk", "nginx")
CHUNK = {
    "id": "x",
    "object": "text_completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "text": "tok ", "logprobs": None, "finish_reason": None}],
}
PROBE = {  # any GET: the peers' health and model probes
    "status": "ok",
    "data": [{"id": "m", "object": "model"}],
    "model_path": "m",
    "is_generation": True,
}
SSE_EVENTS = 8


def sse_body() -> str:
    chunk = json.dumps(CHUNK, separators=(",", ":"))
    return f"data: {chunk}\n\n" * SSE_EVENTS + "data: [DONE]\n\n"


def which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/usr/bin") if Path(p := f"{d}/{tool}").exists()), None
    )


def ensure_tools() -> dict[str, str | None]:
    """wrk and nginx (Debian packages), installed with apt-get when missing; a tool's path, or
    None when it is still missing (the caller falls back and says so)."""
    missing = [t for t in TOOLS if which(t) is None]
    if missing and (os.geteuid() != 0 or not shutil.which("apt-get")):
        print(f"{', '.join(missing)} missing, and no apt-get as root to install them")
    elif missing and apt("install", "-y", "-q", *missing).returncode != 0:
        apt("update", "-q")  # a fresh image has no package lists yet
        done = apt("install", "-y", "-q", *missing)
        if done.returncode != 0:
            print(f"apt-get install {' '.join(missing)} failed: {done.stderr.strip()[-300:]}")
    return {t: which(t) for t in TOOLS}


def apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def nginx_conf(prefix: Path, ports: list[int]) -> str:
    """One server on every port: POST chat completions -> JSON, completions -> SSE, else probe."""
    listens = "".join(f"    listen 127.0.0.1:{p} backlog=4096;\n" for p in ports)
    temps = "".join(
        f"  {kind}_temp_path {prefix}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )

    def quoted(text: str) -> str:  # nginx's single-quoted string: \' and \\ are its escapes
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    full, probe = (json.dumps(b, separators=(",", ":")) for b in (ANSWER, PROBE))
    answers = (
        ("= /v1/chat/completions", "application/json", full),
        ("= /v1/completions", "text/event-stream", sse_body()),
        ("/", "application/json", probe),
    )
    locations = "".join(
        f"    location {where} {{ default_type {kind}; return 200 {quoted(body)}; }}\n"
        for where, kind, body in answers
    )
    return f"""daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
{temps}  server {{
{listens}{locations}  }}
}}
"""


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the backend exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def start_nginx(binary: str, ports: list[int]) -> tuple[subprocess.Popen[bytes], Path]:
    """nginx in the foreground with a prefix dir of its own (the caller removes it); as `nobody`
    when this runs as root, so no nginx process of the benchmark is privileged."""
    prefix = Path(tempfile.mkdtemp(prefix="bench-nginx-"))  # its own: nobody must reach it
    (prefix / "nginx.conf").write_text(nginx_conf(prefix, ports))
    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(prefix, nobody.pw_uid, nobody.pw_gid)
        uid, gid, groups = nobody.pw_uid, nobody.pw_gid, []
    log = (prefix / "stderr.log").open("wb")
    argv = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, user=uid, group=gid, extra_groups=groups
    )
    for port in ports:
        wait_listening(port, proc)
    return proc, prefix


def start_fallback(ports: list[int], log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """The Python fixed-response backend (bench/fake_backend.py, by body), one per port."""
    procs = []
    for port in ports:
        log = (log_dir / f"fake-backend-{port}.log").open("wb")
        argv = [sys.executable, str(ROOT / "bench" / "fake_backend.py"), str(port)]
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        wait_listening(port, procs[-1])
    return procs
