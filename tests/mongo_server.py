"""A real MongoDB wire-protocol server for the tests: SecantusDB, started on 127.0.0.1.

SecantusDB (the ``secantusdb`` test extra, GPL-2.0: never a runtime
dependency) speaks MongoDB's protocol over WiredTiger and reports itself as a
one-member replica set, so change streams and transactions work. Each
``MongoTestServer`` is its own ``secantusd-py`` process with its own storage
directory: ``stop()`` and ``start()`` again keep the data (an outage), ``kill()``
is a crash.

``COMMSYNC_TEST_MONGODB_URI`` points the same tests at a server the tests do not
own (a real mongod); tests that must stop or restart the server then skip, saying so.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pymongo

EXTERNAL_URI = os.environ.get("COMMSYNC_TEST_MONGODB_URI")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binary() -> str | None:
    """secantusd-py next to this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).with_name("secantusd-py")
    return str(here) if here.exists() else shutil.which("secantusd-py")


class MongoTestServer:
    """One SecantusDB process on 127.0.0.1 with storage that survives stop/start."""

    host = "127.0.0.1"

    def __init__(self, storage: str | Path | None = None, *, port: int | None = None, standalone: bool = False):
        self._own_storage = storage is None
        self.storage = Path(storage or tempfile.mkdtemp(prefix="secantus-"))
        self.port = port or _free_port()
        self.standalone = standalone
        self.log_path = self.storage.with_name(self.storage.name + ".log")
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        # directConnection: the one-member replica set announces 127.0.0.1:port, which is us anyway.
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30.0) -> MongoTestServer:
        binary = server_binary()
        if binary is None:
            raise RuntimeError("secantusd-py not found: pip install -e '.[test]'")
        args = [binary, "--host", self.host, "--port", str(self.port), "--storage-path", str(self.storage), "--log-level", "WARNING"]
        if self.standalone:
            args.append("--standalone")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"secantusd-py exited ({self._proc.returncode if self._proc else '?'}):\n{self.log_tail()}")
            try:
                with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500) as client:
                    client.admin.command("ping")
                return
            except pymongo.errors.PyMongoError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"secantusd-py did not answer within {timeout}s:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """A clean shutdown (SIGTERM): the data stays for the next start."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """A crash (SIGKILL): WiredTiger recovers the data at the next start."""
        self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def close(self) -> None:
        """Stop for good and remove the storage this object created."""
        self.stop()
        if self._own_storage:
            shutil.rmtree(self.storage, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> MongoTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_secantus(uri: str) -> bool:
    """True when the server at ``uri`` is SecantusDB (its buildInfo says so)."""
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        return "secantusVersion" in client.admin.command("buildInfo")
