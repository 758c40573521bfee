"""Shared fixtures: the store (mongomock, and real MongoDB when given), Dovecot, sample records."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from commsync.daemon.store import Store, patch_mongomock
from dovecot import dovecot, imap_user  # noqa: F401  (session Dovecot and a fresh user per test)

# The test double, not the product's driver, bends: mongomock 4.3's bulk builder
# rejects the `sort` keyword that pymongo >= 4.11 passes for UpdateOne/ReplaceOne.
patch_mongomock()

MONGODB_URI = os.environ.get("COMMSYNC_TEST_MONGODB_URI")


@pytest.fixture(params=["mongomock", "mongodb"])
async def store(request):
    """The same store tests on mongomock and, when COMMSYNC_TEST_MONGODB_URI is set, a real server."""
    if request.param == "mongomock":
        uri = "memory://"
    elif MONGODB_URI:
        uri = MONGODB_URI
    else:
        pytest.skip("real MongoDB: set COMMSYNC_TEST_MONGODB_URI to run the store tests against a server")
    name = f"commsync_test_{uuid.uuid4().hex[:12]}"
    s = Store.connect(uri, name)
    await s.ensure_indexes()
    yield s
    await s.client.drop_database(name)
    s.close()


@pytest.fixture
async def memory_store():
    """A fresh in-process store (mongomock) for tests about something else than the driver."""
    s = Store.connect("memory://", f"t_{uuid.uuid4().hex[:12]}")
    await s.ensure_indexes()
    yield s
    s.close()


@pytest.fixture
def notify_socket():
    """A datagram socket in the abstract namespace, as systemd's NOTIFY_SOCKET: (address, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + f"commsync-test-{uuid.uuid4().hex}".encode())
    sock.settimeout(5)
    yield "@" + sock.getsockname()[1:].decode(), sock
    sock.close()
