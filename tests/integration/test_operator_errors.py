"""What an operator sees when something is wrong: one line, a non-zero exit, within seconds.

`switchboard` runs as a subprocess, as a user runs it; XDG_STATE_HOME points into tmp_path so
no test reads or writes the real home's record of the last `up`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.cli import natsauth
from services.cli.natsd import NatsServer
from tests.helpers import free_port, free_port_range

pytestmark = pytest.mark.integration
SECRET = "pw-7f3a9c"  # must never be printed


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NATS_URL", "SWITCHBOARD_STATE_DIR", "SUBJECT_PREFIX")
    }
    return env | {"XDG_STATE_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"}


async def start(tmp_path: Path, *args: str, cwd: Path | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        *args,
        cwd=cwd,
        env=cli_env(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def switchboard(
    tmp_path: Path, *args: str, cwd: Path | None = None, limit_s: float = 10.0
) -> tuple[int, list[str]]:
    """Run it to the end; fail if it takes longer than limit_s. (exit code, output lines)."""
    began = time.monotonic()
    proc = await start(tmp_path, *args, cwd=cwd)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"switchboard {' '.join(args)} ran past {limit_s}s") from None
    assert time.monotonic() - began < limit_s
    assert proc.returncode is not None
    return proc.returncode, [line for line in out.decode().splitlines() if line.strip()]


def one_line(lines: list[str]) -> str:
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


# ---- NATS unreachable, refusing the credentials, or not answering ----


@pytest.mark.parametrize("command", [["status"], ["tail"], ["drain", "w-1"]])
async def test_unreachable_nats_is_one_line(tmp_path: Path, command: list[str]) -> None:
    url = f"nats://operator:{SECRET}@127.0.0.1:{free_port()}"
    code, lines = await switchboard(tmp_path, *command, "--nats-url", url)
    line = one_line(lines)
    assert code == 1
    assert line.startswith(f"switchboard {command[0]}: cannot reach NATS at nats://operator:***@")
    assert "(from --nats-url): connection refused" in line
    assert SECRET not in line


@pytest.fixture
def auth_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server with the per-role users `up` configures; yields its plain URL."""
    passwords = {role: "right-password" for role in natsauth.ROLES}
    config = tmp_path / "nats.conf"
    config.write_text(natsauth.render_config("fleet", passwords))
    server = NatsServer(tmp_path / "auth-nats", port=-1, config_file=config)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


async def test_wrong_credentials_are_one_line_at_once(tmp_path: Path, auth_nats: str) -> None:
    state = tmp_path / "sb"
    state.mkdir()
    (state / "operator-url").write_text(natsauth.url_for(auth_nats, "operator", SECRET) + "\n")
    began = time.monotonic()
    code, lines = await switchboard(tmp_path, "status", "--state-dir", str(state))
    line = one_line(lines)
    assert code == 1
    assert f"(credentials from {state / 'operator-url'})" in line
    assert line.endswith("authorization violation (wrong user or password)")
    assert SECRET not in line
    assert "nats://operator:***@127.0.0.1:" in line
    assert time.monotonic() - began < 5  # refused credentials are not retried until the timeout


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """Accepts TCP connections and never says a word: a client waits for NATS's INFO forever."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connected
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_a_silent_server_is_given_up_on(
    tmp_path: Path, silent_server: tuple[int, asyncio.Event]
) -> None:
    port, _ = silent_server
    code, lines = await switchboard(
        tmp_path, "status", "--nats-url", f"nats://127.0.0.1:{port}", "--timeout", "2"
    )
    assert code == 1
    # Either our deadline or the client's own connect timeout (the same 2 s) says it first.
    assert re.search(r": no (connection|answer) within 2s", one_line(lines))


@pytest.mark.parametrize(
    ("command", "sig", "code"),
    [
        (["status"], signal.SIGINT, 130),
        (["drain", "w-1"], signal.SIGTERM, 130),
        (["tail"], signal.SIGINT, 0),  # Ctrl-C is how tail always ends
    ],
)
async def test_a_signal_ends_a_command_that_waits_for_nats(
    tmp_path: Path,
    silent_server: tuple[int, asyncio.Event],
    command: list[str],
    sig: signal.Signals,
    code: int,
) -> None:
    port, connected = silent_server
    proc = await start(
        tmp_path, *command, "--nats-url", f"nats://127.0.0.1:{port}", "--timeout", "60"
    )
    try:
        await asyncio.wait_for(connected.wait(), 10)  # it is inside the first connect now
        proc.send_signal(sig)
        out, _ = await asyncio.wait_for(proc.communicate(), 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == code
    assert out == b""


# ---- `up`: flags and ports checked before anything starts ----


def up_args(tmp_path: Path, **ports: int) -> list[str]:
    """`up` with one sim worker and free ports, except those given."""
    chosen = {
        "nats-port": free_port(),
        "registry-port": free_port(),
        "capacity-port": free_port(),
        "worker-base-port": free_port_range(1),
        "router-port": free_port(),
        **{name.replace("_", "-"): port for name, port in ports.items()},
    }
    args = ["up", "--engine", "sim", "--workers", "1", "--state-dir", str(tmp_path / "sb")]
    for flag, port in chosen.items():
        args += [f"--{flag}", str(port)]
    return args


@pytest.mark.parametrize(
    "flag", ["nats-port", "registry-port", "capacity-port", "worker-base-port", "router-port"]
)
async def test_a_port_in_use_is_named_with_its_flag(tmp_path: Path, flag: str) -> None:
    # What another stack leaves listening; its routers use SO_REUSEPORT, which would have let
    # this `up` share the port with them.
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        code, lines = await switchboard(tmp_path, *up_args(tmp_path, **{flag: port}))
    finally:
        taken.close()
    assert code != 0
    assert one_line(lines).startswith(f"switchboard up: port {port} is in use (--{flag}")
    assert not (tmp_path / "sb" / "nats").exists()  # nothing was started


async def test_a_missing_model_directory_names_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    code, lines = await switchboard(tmp_path, *up_args(tmp_path), "--model", str(missing))
    assert code != 0
    assert one_line(lines) == (
        f"switchboard up: --model {missing} is not a model directory "
        "(needs config.json and *.safetensors)"
    )


async def test_exllamav2_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    from services.worker.engines.exl2 import cuda_ready

    if cuda_ready()[0]:
        pytest.skip("this machine can run exllamav2")
    args = [a if a != "sim" else "exllamav2" for a in up_args(tmp_path)]
    code, lines = await switchboard(tmp_path, *args)
    assert code != 0
    assert one_line(lines).startswith("switchboard up: --engine exllamav2 ")


async def test_a_bad_flag_value_is_one_line(tmp_path: Path) -> None:
    code, lines = await switchboard(tmp_path, *up_args(tmp_path, router_port=99999))
    assert code == 2
    assert one_line(lines) == (
        "switchboard up: argument --router-port: '99999' is not a port number (1-65535) "
        "(see switchboard up --help)"
    )


# ---- a running stack: found from anywhere, and a second one on its ports refused ----


@pytest.mark.e2e
async def test_status_finds_up_from_another_directory_and_a_second_up_is_refused(
    tmp_path: Path,
) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    args = up_args(tmp_path)
    proc = await start(tmp_path, *args, cwd=here)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not any("stack is up" in line for line in lines):
            raw = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert raw, "\n".join(lines)
            lines.append(raw.decode().rstrip())

        code, table = await switchboard(tmp_path, "status", cwd=elsewhere)
        assert code == 0, table
        assert any(" ready " in f" {row} " for row in table), table

        # The same ports again, as a second `make up` on this machine would try.
        code, refused = await switchboard(tmp_path, *args, cwd=elsewhere)
        line = one_line(refused)
        assert code != 0
        for flag in ("--nats-port", "--registry-port", "--capacity-port", "--router-port"):
            port = args[args.index(flag) + 1]
            assert f"port {port} is in use ({flag})" in line
        code, table = await switchboard(tmp_path, "status", cwd=elsewhere)
        assert code == 0, table  # the first stack did not notice
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 60)
    assert proc.returncode == 0
    assert not (tmp_path / "xdg" / "switchboard" / "last-up").exists()  # no stale record


@pytest.mark.parametrize("service", ["registry", "capacity", "worker", "router"])
async def test_a_service_gives_up_its_first_connect_in_one_line(
    tmp_path: Path, service: str
) -> None:
    env = cli_env(tmp_path) | {
        "NATS_URL": f"nats://{service}:{SECRET}@127.0.0.1:{free_port()}",
        "NATS_CONNECT_TIMEOUT_S": "1",
        "LOG_FORMAT": "text",
        "WORKER_ENGINE": "sim",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"services.{service}",
        "--http-port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 1
    errors = [line for line in out.decode().splitlines() if " ERROR " in line]
    assert len(errors) == 1, out.decode()
    assert errors[0].endswith(
        f"cannot reach NATS at nats://{service}:***@127.0.0.1:"
        + env["NATS_URL"].rsplit(":", 1)[1]
        + ": connection refused"
    )
    assert "Traceback" not in out.decode()
    assert SECRET not in out.decode()
