"""nats-server's startup chatter, cut for people: version, listen address, store; warnings."""

from __future__ import annotations

from services.cli.natsd import brief

BANNER = """\
[1] 2026/11/30 14:29:55.058541 [INF] Starting nats-server
[1] 2026/11/30 14:29:55.058581 [INF]   Version:  2.15.1
[1] 2026/11/30 14:29:55.058583 [INF]   Git:      [b2fd3ef]
[1] 2026/11/30 14:29:55.058589 [WRN] Plaintext passwords detected, use nkeys or bcrypt
[1] 2026/11/30 14:29:55.058807 [INF] Starting JetStream
[1] 2026/11/30 14:29:55.059027 [INF]     _ ___ _____ ___ _____ ___ ___   _   __  __
[1] 2026/11/30 14:29:55.059045 [INF]   Strict:          true
[1] 2026/11/30 14:29:55.059049 [INF]   Store Directory: "/s/nats/jetstream"
[1] 2026/11/30 14:29:55.059594 [INF] Took 784.93µs to start JetStream
[1] 2026/11/30 14:29:55.059795 [INF] Listening for client connections on 127.0.0.1:4222
[1] 2026/11/30 14:29:55.059805 [INF] Server is ready
[1] 2026/11/30 14:29:57.070873 [FTL] Error listening on port: 127.0.0.1:4222, "bind: in use"
[1] 2026/11/30 14:31:40.727448 [INF] Initiating Shutdown..."""


def test_brief_keeps_what_matters() -> None:
    kept = [line for line in map(brief, BANNER.splitlines()) if line is not None]
    assert kept == [
        "nats-server v2.15.1",
        "[WRN] Plaintext passwords detected, use nkeys or bcrypt",
        "JetStream store: /s/nats/jetstream",
        "Listening for client connections on 127.0.0.1:4222",
        '[FTL] Error listening on port: 127.0.0.1:4222, "bind: in use"',
    ]
    assert brief("not a log line") == "not a log line"
