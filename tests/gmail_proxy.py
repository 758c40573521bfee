"""An IMAP proxy that makes the test Dovecot look like Gmail's IMAP extension.

Dovecot has no X-GM-EXT-1, so this proxy, on 127.0.0.1 in front of
Dovecot's plain port, adds it: the capability is advertised, a FETCH of
``X-GM-MSGID`` is sent on as Dovecot's ``X-GUID`` and the answer comes back
as ``X-GM-MSGID <number>`` (a stable number derived from the GUID). Literals
(message bodies) pass through untouched in both directions. Enough for the
client side of the extension; nothing else of Gmail is imitated.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Callable

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_CAPABILITY = re.compile(rb"(CAPABILITY IMAP4rev1)", re.IGNORECASE)
_X_GUID = re.compile(rb'X-GUID ("?)([^\s)"]+)\1')
_ASK_MSGID = re.compile(rb"X-GM-MSGID", re.IGNORECASE)


def gmail_msgid(guid: bytes) -> int:
    """The X-GM-MSGID this proxy reports for a Dovecot GUID (a 60-bit number)."""
    return int(hashlib.sha256(guid).hexdigest()[:15], 16)


def _from_server(line: bytes) -> bytes:
    line = _CAPABILITY.sub(rb"\1 X-GM-EXT-1", line)
    return _X_GUID.sub(lambda m: b"X-GM-MSGID %d" % gmail_msgid(m.group(2)), line)


def _from_client(line: bytes) -> bytes:
    return _ASK_MSGID.sub(b"X-GUID", line)


class GmailProxy:
    """``GmailProxy(host, port).start()``; clients connect to ``proxy.port``."""

    host = "127.0.0.1"

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False

    def __enter__(self) -> GmailProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> GmailProxy:
        threading.Thread(target=self._accept, name="gmail-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            threading.Thread(target=_pump, args=(server, client, _from_server), daemon=True).start()
            threading.Thread(target=_pump, args=(client, server, _from_client), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket, rewrite: Callable[[bytes], bytes]) -> None:
    reader = src.makefile("rb")
    try:
        while True:
            line = reader.readline()
            if not line:
                break
            dst.sendall(rewrite(line))
            literal = _LITERAL.search(line)
            if literal:
                dst.sendall(reader.read(int(literal.group(1))))
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
