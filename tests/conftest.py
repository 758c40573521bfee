"""Shared fixtures: stores on mongomock and on a real MongoDB server, Dovecot, sample records.

The real server is SecantusDB, started once per session on 127.0.0.1 (see
mongo_server.py), or whatever ``COMMSYNC_TEST_MONGODB_URI`` names (a real
mongod). Store tests take the ``store`` fixture and run on both, with ids
``[mongomock]`` and ``[real]``; tests that only a server can answer take
``real_store`` or ``mongodb``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from dataclasses import dataclass

import pytest

from commsync.daemon import app
from commsync.daemon.cli import main
from commsync.daemon.store import Store, patch_mongomock

from dovecot import dovecot, imap_user  # noqa: F401  (session Dovecot and a fresh user per test)
from mongo_server import EXTERNAL_URI, MongoTestServer, is_secantus, server_binary
from sinks import Shared

# The test double, not the product's driver, bends: mongomock 4.3's bulk builder
# rejects the `sort` keyword that pymongo >= 4.11 passes for UpdateOne/ReplaceOne.
patch_mongomock()


# A test that uses any of these talks to a server the tests start: `pytest -m "not integration"` leaves it out.
_SERVER_FIXTURES = {"dovecot", "imap_user", "mongodb", "real_store", "oauth_dovecot"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        real = callspec is not None and "real" in callspec.id.split("-")
        if real or _SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)


@dataclass(frozen=True)
class MongoDB:
    """The session's real server: its URI, and the process when the tests own it."""

    uri: str
    server: MongoTestServer | None
    secantus: bool

    def database(self) -> str:
        return f"commsync_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def mongodb():
    """A real MongoDB server for the whole session (fails under CI when none can start)."""
    if EXTERNAL_URI:
        yield MongoDB(EXTERNAL_URI, None, is_secantus(EXTERNAL_URI))
        return
    if server_binary() is None:
        msg = "real MongoDB server unavailable: secantusd-py not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(msg + " -- required when CI is set", pytrace=False)
        pytest.skip(msg)
    server = MongoTestServer()
    server.start()
    try:
        yield MongoDB(server.uri, server, True)
    finally:
        server.close()


@pytest.fixture(params=["mongomock", "real"])
def db_config(request):
    """``mongodb:`` settings of a fresh database, on mongomock and on the real server."""
    name = f"commsync_test_{uuid.uuid4().hex[:12]}"
    if request.param == "mongomock":
        return {"uri": "memory://", "database": name}
    return {"uri": request.getfixturevalue("mongodb").uri, "database": name, "server_selection_timeout": "10s"}


async def _open(config):
    s = Store.connect(config["uri"], config["database"])
    await s.ensure_indexes()
    return s


@pytest.fixture
async def store(db_config):
    """A fresh store, once on mongomock and once on the real server."""
    s = await _open(db_config)
    yield s
    await s.client.drop_database(db_config["database"])
    s.close()


@pytest.fixture
async def real_store(mongodb):
    """A fresh store on the real server only (validators, explain, collMod, change streams)."""
    config = {"uri": mongodb.uri, "database": mongodb.database()}
    s = await _open(config)
    yield s
    await s.client.drop_database(config["database"])
    s.close()


@pytest.fixture
async def memory_store():
    """A fresh in-process store (mongomock) for tests about something else than the driver."""
    s = Store.connect("memory://", f"t_{uuid.uuid4().hex[:12]}")
    await s.ensure_indexes()
    yield s
    s.close()


@pytest.fixture
def cli(db_config, tmp_path, monkeypatch, capsys):  # noqa: C901 - a small class of helpers
    """Run `commsync ...` commands on one config; returns (exit code, stdout) and the store they share."""

    class Cli:
        config = tmp_path / "commsync.yaml"
        memory = Store.connect(db_config["uri"], db_config["database"]) if db_config["uri"] == "memory://" else None

        def write(self, **settings):
            self.config.write_text(json.dumps({"mongodb": db_config, "internal_domains": ["ourco.example"], **settings}))

        def __call__(self, *argv):
            capsys.readouterr()
            code = main([*argv, "-c", str(self.config)])
            return code, capsys.readouterr().out

        def db(self, work):
            """Run ``work(store)`` (a coroutine function) on a store of its own event loop, as each command has."""

            async def run():
                store = self.memory or Store.connect(db_config["uri"], db_config["database"])
                try:
                    return await work(store)
                finally:
                    if self.memory is None:
                        store.close()

            return asyncio.run(run())

    runner = Cli()
    if runner.memory is not None:

        def open_store(settings):
            runner.memory.capture = app.capture_policy(settings)
            runner.memory.default_region = settings.default_region
            return Shared(runner.memory)

        monkeypatch.setattr(app, "open_store", open_store)
    yield runner


@pytest.fixture
def notify_socket():
    """A datagram socket in the abstract namespace, as systemd's NOTIFY_SOCKET: (address, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + f"commsync-test-{uuid.uuid4().hex}".encode())
    sock.settimeout(5)
    yield "@" + sock.getsockname()[1:].decode(), sock
    sock.close()
