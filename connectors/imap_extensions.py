"""What imapclient does not do for us: NOTIFY, LIST-STATUS, and FETCH of a UID range. Blocking calls.

Knowing when a mailbox has new mail:

* IDLE (RFC 2177) reports new mail in the selected folder.
* NOTIFY (RFC 5465, which Dovecot offers) makes the same IDLE report every
  watched folder: the server sends ``STATUS`` responses for the others. One
  connection then watches all configured folders.
* Without NOTIFY, the other folders are checked every ``check_every`` seconds
  with one ``LIST ... RETURN (STATUS (UIDNEXT UIDVALIDITY))`` (RFC 5819
  LIST-STATUS, Dovecot and Cyrus), else one ``STATUS`` per folder.

A folder "has new mail" when its UIDVALIDITY differs from, or its UIDNEXT is
above, what the last pass scanned.

`fetch_range` fetches ``start:end`` as one command (imapclient's fetch wants
a list of UIDs, which for a whole folder is a very long command line).

These functions run in the connector's IMAP thread and speak through
imapclient's imaplib connection.
"""

from __future__ import annotations

import imaplib
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import imapclient
from imapclient.imap_utf7 import decode as utf7_decode
from imapclient.imap_utf7 import encode as utf7_encode
from imapclient.response_parser import parse_fetch_response, parse_response

# imaplib refuses commands it does not know.
imaplib.Commands.setdefault("NOTIFY", ("AUTH", "SELECTED"))


Scanned = Mapping[str, tuple[int, int]]  # folder -> (UIDVALIDITY, UIDNEXT) as of the last scan


def newer(folder: str, uidvalidity: int | None, uidnext: int | None, scanned: Scanned) -> bool:
    """True when ``folder`` holds mail the last scan did not see (or was never scanned)."""
    seen = scanned.get(folder)
    if seen is None:
        return True
    if uidvalidity is not None and uidvalidity != seen[0]:
        return True
    return uidnext is not None and uidnext > seen[1]


def _quoted(folder: str) -> str:
    name = utf7_encode(folder).decode("ascii")
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _name(raw: Any) -> str:
    if isinstance(raw, bytes):
        return utf7_decode(raw)
    return str(raw)


def _status_fields(items: Any) -> tuple[int | None, int | None]:
    """(UIDVALIDITY, UIDNEXT) from a STATUS response's attribute list."""
    values = dict(zip(items[::2], items[1::2], strict=False)) if isinstance(items, tuple | list) else {}
    uidvalidity, uidnext = values.get(b"UIDVALIDITY"), values.get(b"UIDNEXT")
    return (int(uidvalidity) if uidvalidity is not None else None, int(uidnext) if uidnext is not None else None)


def notify_set(client: imapclient.IMAPClient, others: Iterable[str]) -> dict[str, tuple[int | None, int | None]]:
    """Ask for MessageNew in the selected folder and in ``others`` (RFC 5465); their STATUS as of now."""
    names = " ".join(_quoted(f) for f in others)
    # MessageNew only together with MessageExpunge (RFC 5465 5.2; Dovecot answers BAD otherwise); expunges are ignored.
    spec = "(selected (MessageNew (UID) MessageExpunge)) " + (f"(mailboxes ({names}) (MessageNew MessageExpunge))" if names else "")
    imap = client._imap
    imap.untagged_responses.pop("STATUS", None)
    typ, data = imap._simple_command("NOTIFY", "SET", "STATUS", spec.strip())
    if typ != "OK":
        raise imapclient.exceptions.IMAPClientError(f"NOTIFY SET failed: {data!r}")
    # STATUS asks for each watched folder's state now; what arrived with the command is here, the rest comes during IDLE.
    return _parse_statuses(imap.untagged_responses.pop("STATUS", []))


def notify_none(client: imapclient.IMAPClient) -> None:
    """Stop notifications (they would otherwise interleave with the next pass's commands)."""
    client._imap._simple_command("NOTIFY", "NONE")
    client._imap.untagged_responses.pop("STATUS", None)


def statuses(client: imapclient.IMAPClient, folders: list[str], list_status: bool) -> dict[str, tuple[int | None, int | None]]:
    """(UIDVALIDITY, UIDNEXT) of ``folders``: one LIST-STATUS command where offered, else one STATUS each."""
    if not folders:
        return {}
    if not list_status:
        out = {}
        for folder in folders:
            info = client.folder_status(folder, [b"UIDNEXT", b"UIDVALIDITY"])
            out[folder] = (int(info[b"UIDVALIDITY"]), int(info[b"UIDNEXT"]))
        return out
    imap = client._imap
    imap.untagged_responses.pop("STATUS", None)
    patterns = "(" + " ".join(_quoted(f) for f in folders) + ")"
    typ, data = imap._simple_command("LIST", '""', patterns, "RETURN", "(STATUS (UIDNEXT UIDVALIDITY))")
    if typ != "OK":
        raise imapclient.exceptions.IMAPClientError(f"LIST-STATUS failed: {data!r}")
    imap.untagged_responses.pop("LIST", None)
    return _parse_statuses(imap.untagged_responses.pop("STATUS", []))


def _parse_statuses(lines: Iterable[bytes]) -> dict[str, tuple[int | None, int | None]]:
    out = {}
    for line in lines:
        parsed = parse_response([line])
        if len(parsed) >= 2:
            out[_name(parsed[0])] = _status_fields(parsed[1])
    return out


def idle(
    client: imapclient.IMAPClient,
    seconds: float,
    stop: threading.Event,
    *,
    selected: str,
    scanned: Scanned,
) -> set[str]:
    """One IDLE of at most ``seconds``; the folders with new mail (the selected one, or NOTIFY's others).

    It blocks until the server says something or the time is up, without
    waking up in between: a wakeup costs some 0.1 to 0.2 ms of CPU, which a
    wakeup a second in each of hundreds of mailboxes turns into a good part
    of a core. To end it early, cut the connection (``stop`` is checked
    whenever the server speaks).
    """
    client.idle()
    end = time.monotonic() + seconds
    changed: set[str] = set()
    try:
        while not changed and not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                break
            started = time.monotonic()
            responses = client.idle_check(left)
            changed |= _changes(responses, selected, scanned)
            if not responses and time.monotonic() - started < left / 2:
                # Readable but nothing to parse: most likely the server hung up; DONE tells.
                break
    finally:
        _, responses = client.idle_done()
    return changed | _changes(responses, selected, scanned)


def _changes(responses: Iterable[Any], selected: str, scanned: Scanned) -> set[str]:
    out = set()
    for r in responses:
        if not isinstance(r, tuple) or len(r) < 2:
            continue
        # "* 12 EXISTS" arrives as (12, b"EXISTS"); EXPUNGE, FETCH (flags) and "OK Still here" are not new mail.
        if r[1] == b"EXISTS":
            out.add(selected)
        elif r[0] == b"STATUS" and len(r) >= 3:
            folder = _name(r[1])
            if newer(folder, *_status_fields(r[2]), scanned):
                out.add(folder)
    return out


def fetch_range(client: imapclient.IMAPClient, start: int, end: int, items: list[str]) -> dict[int, dict[bytes, Any]]:
    """``UID FETCH start:end (items)`` in one command; UID -> data, for the UIDs in that range."""
    imap = client._imap
    tag = imap._command("UID", "FETCH", f"{start}:{end}".encode(), "(" + " ".join(items) + ")")
    typ, data = imap._command_complete("FETCH", tag)
    if typ != "OK":
        raise imapclient.exceptions.IMAPClientError(f"fetch failed: {data!r}")
    typ, data = imap._untagged_response(typ, data, "FETCH")
    response = parse_fetch_response(data, False, True)
    # "n:m" also answers the highest UID when it lies below n; and unsolicited FETCHes may come along.
    return {uid: value for uid, value in response.items() if isinstance(uid, int) and start <= uid <= end}
