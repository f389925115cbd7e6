"""`up`'s ports: bound once before anything starts, every problem in one message."""

from __future__ import annotations

import socket

import pytest

from services.common.ports import PortError, claim, release, serving_socket
from tests.helpers import free_port


def test_claim_binds_each_port_once_and_names_every_problem() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy, free, doubled = taken.getsockname()[1], free_port(), free_port()
    try:
        with pytest.raises(PortError) as caught:
            claim(
                [
                    ("127.0.0.1", busy, "--router-port"),
                    ("127.0.0.1", free, "--registry-port"),
                    ("127.0.0.1", doubled, "--capacity-port"),
                    ("127.0.0.1", doubled, "--worker-base-port, worker-1"),
                ]
            )
    finally:
        taken.close()
    assert str(caught.value) == (
        f"port {doubled} is given to both --capacity-port and --worker-base-port, worker-1; "
        f"port {busy} is in use (--router-port)"
    )
    again = claim([("127.0.0.1", free, "--registry-port")])  # what failed was released
    release(again)


def test_routers_share_one_claimed_socket_which_a_child_inherits() -> None:
    port = free_port()
    claimed = claim([("127.0.0.1", port, "--router-port"), ("127.0.0.1", port, "--router-port")])
    try:
        assert list(claimed) == [port]
        inherited = serving_socket(claimed[port].fileno(), "0.0.0.0", 1)
        assert inherited.getsockname() == ("127.0.0.1", port)
        assert inherited.proto == socket.IPPROTO_TCP  # TCP_NODELAY on accepted sockets
        inherited.detach()  # same fd as the claimed socket; released below
    finally:
        release(claimed)
