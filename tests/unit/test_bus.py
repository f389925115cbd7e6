"""The one line a failed first connect to NATS turns into: which NATS, from where, why."""

from __future__ import annotations

import nats.errors

from services.common.bus import connect_failure, mask_url


def test_mask_url_hides_every_password_and_token() -> None:
    assert mask_url("nats://op:s3cret@h:4222") == "nats://op:***@h:4222"
    assert mask_url("nats://t0ken@h:4222") == "nats://***@h:4222"
    assert mask_url("nats://a:x@h1:1,nats://a:y@h2:2") == "nats://a:***@h1:1,nats://a:***@h2:2"
    assert mask_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_connect_failure_names_the_cause() -> None:
    url = "nats://op:s3cret@127.0.0.1:4222"
    source = "credentials from .switchboard/operator-url"
    refused = ConnectionRefusedError(111, "Connect call failed")
    assert connect_failure(url, source, 5, [refused]) == (
        "cannot reach NATS at nats://op:***@127.0.0.1:4222 "
        "(credentials from .switchboard/operator-url): connection refused"
    )
    auth = nats.errors.Error("nats: 'Authorization Violation'")
    reset = ConnectionResetError(104, "Connection reset by peer")
    # The server hangs up after refusing; the refusal is the news.
    assert connect_failure(url, "", 5, [auth, reset]).endswith(
        "127.0.0.1:4222: authorization violation (wrong user or password)"
    )
    assert connect_failure(url, "", 2.5, []).endswith(": no connection within 2.5s")
    assert connect_failure(url, "", 5, [TimeoutError()]).endswith(
        ": no answer within 5s (is it a NATS server?)"
    )
