"""sd_notify over real unix datagram sockets: filesystem and abstract addresses."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import pytest

from commsync.daemon.notify import Notifier


@pytest.fixture
def listener(tmp_path):
    """A datagram socket like systemd's; yields (NOTIFY_SOCKET value, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = f"/tmp/cs-notify-{uuid.uuid4().hex[:8]}.sock"  # sun_path is short; tmp_path may be long
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()
    os.unlink(path)


def test_ready_and_status_reach_a_filesystem_socket(listener):
    address, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("2 sources; no errors")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 sources; no errors"
    assert notifier.status("last batch\n12:00 sales +3")
    assert sock.recv(4096) == b"STATUS=last batch 12:00 sales +3"  # one line
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_abstract_namespace_address(notify_socket):
    address, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval is None


def test_a_vanished_socket_is_logged_not_raised(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready() is False


def test_watchdog_interval_and_pid():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 30.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 30.0
    # Meant for another process (e.g. we were forked by the main one): not ours to ping.
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None


async def test_watchdog_loop_pings_from_the_event_loop(notify_socket):
    address, sock = notify_socket
    sock.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(notifier.watchdog_loop())
    loop = asyncio.get_running_loop()
    try:
        pings = [await asyncio.wait_for(loop.sock_recv(sock, 4096), 5) for _ in range(3)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()
    assert pings == [b"WATCHDOG=1"] * 3
