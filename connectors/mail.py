"""Email normalization: raw RFC 822 bytes in, one commsync record dict out.

This module is pure (no I/O) and must never raise: mailboxes contain decades of
broken mail, and one unreadable message must not stall a sync. Every risky step
is wrapped on its own, so a bad part costs only that part, and what went wrong
is recorded in the record's ``parse_defects``.

Speed matters (initial syncs of large mailboxes), so the message is parsed with
the fast ``compat32`` policy and only the pieces the record needs are decoded:
a handful of headers and one body part. The pipeline's steps live in their own
modules: ``mime`` (the Message tree, bodies sliced rather than read line by
line), ``headers`` (header text), ``addresses`` (participants), ``body``
(content and attachments) and ``charsets`` (decoding); this module puts the
record together and owns dates and ids.

Size caps. A record must fit in one MongoDB document (16 MiB) whatever the
message says, so every field that grows with the input is capped, and a
boolean next to it says it was cut:

================  ===============================================  ==========================
field             cap                                              flag
================  ===============================================  ==========================
content           ``max_content_chars``, never above 1,000,000     ``content_truncated``
subject           2,000 characters                                 ``subject_truncated``
participants      1,000 entries; names cut at 256 characters;      ``participants_truncated``
                  addresses over 254 characters dropped; reading
                  stops after 10,000 entries
references        100 ids: the first (the thread root) and the     ``references_truncated``
                  latest 99; longer ids (> 998) are dropped as junk
attachments       500 entries; filename and content type cut at    ``attachments_truncated``
                  255 characters
================  ===============================================  ==========================

``message_id``, ``in_reply_to``, ``thread_id`` and ``_id`` are single ids of at
most 998 characters (longer ones are not ids), ``parse_defects`` holds at most
20 short strings and ``automated_by`` at most 4. Worst case, with every
character four bytes of UTF-8: content 4.0 MB + participants 2.1 MB +
attachments 1.0 MB + references 0.4 MB + the rest under 0.1 MB, about 7.2 MiB
(tests/test_mail_caps.py builds it), which leaves more than half of the limit
for the fields the store adds.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from email.message import Message
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any

from . import addresses, mime
from .body import Body
from .defects import Defects
from .headers import Headers, all_values, collapse, first, subject_text, wanted_headers

__all__ = ["extract_ids", "message_id_of", "normalize_email", "normalize_message_id"]

_MAX_ID_CHARS = 998  # longer "ids" are junk and would bloat the _id index
# Size caps: see the module docstring.
_MAX_CONTENT_CHARS = 1_000_000
_MAX_SUBJECT_CHARS = 2_000
_MAX_REFERENCES = 100
_MIN_DATE = datetime(1980, 1, 1, tzinfo=UTC)
_MAX_CLOCK_SKEW = timedelta(days=2)

# Headers that mark mail a machine sent (RFC 3834 auto-replies, RFC 2919 lists,
# bulk senders, RFC 2369/8058 newsletters); see `_automated_by`.
_AUTOMATION_HEADERS = ("auto-submitted", "list-id", "precedence", "list-unsubscribe")
_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply"})
_WANTED_HEADERS = frozenset(
    {*addresses.ADDRESS_ROLES, "subject", "date", "message-id", "in-reply-to", "references", *_AUTOMATION_HEADERS}
)

_ANGLE_ID = re.compile(r"<([^<>]*)>")


# --------------------------------------------------------------------------- public API


def normalize_message_id(value: str | None) -> str | None:
    """Normalize one Message-ID: no brackets or whitespace, lowercase domain.

    The local part keeps its case (it is case-sensitive per RFC 5322). Returns
    None for empty, absurdly long or punctuation-only values, because such ids
    would make unrelated messages collide.
    """
    if not value or not isinstance(value, str):
        return None
    match = _ANGLE_ID.search(value)
    candidate = match.group(1) if match else value
    # Folding inside a broken id leaves CRLF+spaces in it; an id has no whitespace.
    candidate = "".join(candidate.split()).strip("<>").replace("\x00", "")
    if not candidate or len(candidate) > _MAX_ID_CHARS:
        return None
    if not any(ch.isalnum() for ch in candidate):
        return None
    local, at, domain = candidate.rpartition("@")
    return f"{local}@{domain.lower()}" if at else candidate


def message_id_of(header: bytes) -> str | None:
    """The normalized Message-ID of a message's header bytes, read exactly as capture reads it.

    verify lists a folder's ids from ``HEADER.FIELDS (MESSAGE-ID)`` alone; reading
    them any other way (a regex, another decoding) would make verify and capture
    disagree on folded, 8-bit or duplicated ids and report stored messages missing.
    """
    msg = _parse(header, Defects())
    if msg is None:
        return None
    return _message_id(wanted_headers(msg, {"message-id"}, Defects()), None)


def extract_ids(value: str | None) -> list[str]:
    """Return the normalized message ids of a References/In-Reply-To value.

    Ids are returned in order and deduplicated. Values without angle brackets
    (some clients emit bare ids) fall back to whitespace/comma separated tokens
    that contain an ``@``.
    """
    if not value or not isinstance(value, str):
        return []
    tokens = _ANGLE_ID.findall(value)
    if not tokens:
        tokens = [t for t in re.split(r"[\s,]+", value) if "@" in t]
    result: dict[str, None] = {}  # ordered set: a list's `in` made 100,000 ids take minutes
    for token in tokens:
        mid = normalize_message_id(token)
        if mid:
            result[mid] = None
    return list(result)


def normalize_email(
    raw: bytes,
    *,
    own_addresses: frozenset[str] = frozenset(),
    internal_domains: frozenset[str] = frozenset(),
    received_at: datetime | None = None,
    max_content_chars: int = 100_000,
    truncated_fetch: bool = False,
) -> dict:
    """Turn one raw RFC 822 message into a commsync email record.

    ``own_addresses`` / ``internal_domains`` decide the direction and which
    participants are internal (case-insensitive, exact domain match).
    ``received_at`` (IMAP INTERNALDATE) replaces a missing or absurd Date
    header. ``truncated_fetch`` says the caller fetched only the head of a huge
    message, so the content is known to be incomplete.

    Never raises: whatever cannot be decoded is left out and described in
    ``parse_defects``.
    """
    defects = Defects()
    raw = _as_bytes(raw, defects)
    try:
        return _normalize(
            raw,
            defects,
            own=_lowered_set(own_addresses),
            domains=_lowered_set(internal_domains, strip="@"),
            received_at=received_at,
            max_chars=_content_cap(max_content_chars),
            truncated_fetch=truncated_fetch,
        )
    except Exception as exc:  # last line of defence: the per-step guards missed something
        defects.add(f"normalize:failed:{type(exc).__name__}")
        return _minimal_record(raw, defects, received_at, truncated_fetch)


# --------------------------------------------------------------------------- pipeline


def _normalize(
    raw: bytes,
    defects: Defects,
    *,
    own: frozenset[str],
    domains: frozenset[str],
    received_at: datetime | None,
    max_chars: int,
    truncated_fetch: bool,
) -> dict[str, Any]:
    msg = _parse(raw, defects)
    body = Body(msg, defects, max_chars) if msg is not None else Body.empty()
    headers = wanted_headers(msg, _WANTED_HEADERS, defects) if msg is not None else {}
    hint = body.charset_hint

    participants, participants_cut = addresses.participants(headers, hint, own, domains, defects)
    subject, subject_cut = subject_text(headers, hint, defects, _MAX_SUBJECT_CHARS)
    date_text = first(headers, "date", hint)
    occurred_at = _occurred_at(date_text, received_at, defects)

    message_id = _message_id(headers, hint)
    if message_id is None:
        defects.add("message-id:missing")
    in_reply_to = _first_id(all_values(headers, "in-reply-to", hint))
    references = extract_ids(" ".join(all_values(headers, "references", hint)))
    references_cut = len(references) > _MAX_REFERENCES
    if references_cut:
        # What clients keep when they trim References (RFC 5322 3.6.4): the root and the latest.
        references = references[:1] + references[1 - _MAX_REFERENCES :]

    record_id = message_id or _fallback_id(participants, date_text, subject, body.hash_text)
    automated_by = _automated_by(headers, hint)
    sender = next((p for p in participants if p["role"] == "from"), None)
    _collect_parser_defects(body.visited, defects)

    return {
        "_id": record_id,
        "channel": "email",
        "direction": "outbound" if sender and sender["internal"] else "inbound",
        "occurred_at": occurred_at,
        "participants": participants,
        "subject": subject,
        "content": body.text,
        "content_truncated": body.truncated or bool(truncated_fetch),
        "message_id": message_id,
        "in_reply_to": in_reply_to,
        "references": references,
        "thread_id": references[0] if references else in_reply_to or message_id or record_id,
        "attachments": body.attachments,
        "size": len(raw),
        "parse_defects": list(defects.items),
        "automated": bool(automated_by),
        "automated_by": automated_by,
        "subject_truncated": subject_cut,
        "participants_truncated": participants_cut,
        "references_truncated": references_cut,
        "attachments_truncated": body.attachments_truncated,
    }


def _automated_by(headers: Headers, hint: str | None) -> list[str]:
    """The automation headers that mark this message as sent by a machine, in a fixed order."""
    found = []
    auto = (first(headers, "auto-submitted", hint) or "").split(";")[0].strip().lower()
    if auto and auto != "no":
        found.append("auto-submitted")
    if (first(headers, "list-id", hint) or "").strip():
        found.append("list-id")
    if (first(headers, "precedence", hint) or "").strip().lower() in _BULK_PRECEDENCE:
        found.append("precedence")
    if (first(headers, "list-unsubscribe", hint) or "").strip():
        found.append("list-unsubscribe")
    return found


def _minimal_record(
    raw: bytes, defects: Defects, received_at: datetime | None, truncated_fetch: bool
) -> dict[str, Any]:
    """Record for a message whose normalization failed outright."""
    record_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    return {
        "_id": record_id,
        "channel": "email",
        "direction": "inbound",
        "occurred_at": _safe_received_at(received_at),
        "participants": [],
        "subject": None,
        "content": "",
        "content_truncated": bool(truncated_fetch),
        "message_id": None,
        "in_reply_to": None,
        "references": [],
        "thread_id": record_id,
        "attachments": [],
        "size": len(raw),
        "parse_defects": list(defects.items),
        "automated": False,
        "automated_by": [],
        "subject_truncated": False,
        "participants_truncated": False,
        "references_truncated": False,
        "attachments_truncated": False,
    }


def _as_bytes(raw: Any, defects: Defects) -> bytes:
    if isinstance(raw, bytes):
        return raw
    try:
        if isinstance(raw, (bytearray, memoryview)):
            return bytes(raw)
        if isinstance(raw, str):
            return raw.encode("utf-8", "surrogateescape")
    except Exception:
        pass
    defects.add("input:not-bytes")
    return b""


def _message_id(headers: Headers, hint: str | None) -> str | None:
    """The record's Message-ID: the first header of the name, unfolded and decoded, normalized."""
    return normalize_message_id(first(headers, "message-id", hint))


def _parse(raw: bytes, defects: Defects) -> Message | None:
    try:
        return mime.parse(raw)
    except Exception as exc:
        defects.add(f"parse:failed:{type(exc).__name__}")
        return None


def _collect_parser_defects(parts: list[Message], defects: Defects) -> None:
    for part in parts:
        for defect in getattr(part, "defects", ()):
            defects.add(type(defect).__name__)


def _content_cap(value: Any) -> int:
    try:
        return min(max(0, int(value)), _MAX_CONTENT_CHARS)
    except Exception:
        return 100_000


def _lowered_set(values: Any, strip: str = "") -> frozenset[str]:
    """Lowercased copy of an address/domain set; tolerates sets, lists, a str."""
    if isinstance(values, str):
        values = (values,)
    try:
        key = values if isinstance(values, frozenset) else frozenset(values or ())
    except TypeError:
        key = frozenset()
    return _lowered(key, strip)


@lru_cache(maxsize=64)
def _lowered(values: frozenset[str], strip: str = "") -> frozenset[str]:
    # Cached: callers pass the same configured sets for every message.
    return frozenset(v.strip().lower().lstrip(strip) for v in values if isinstance(v, str))



# --------------------------------------------------------------------------- dates


def _occurred_at(
    date_text: str | None, received_at: datetime | None, defects: Defects
) -> datetime:
    """Date header in UTC, else received_at, else now; always ms precision."""
    fallback = _safe_received_at(received_at)
    if not date_text or not date_text.strip():
        defects.add("date:missing")
        return fallback
    try:
        parsed = parsedate_to_datetime(date_text.strip())
    except Exception:
        defects.add("date:unparseable")
        return fallback
    try:
        if parsed.tzinfo is None:  # "-0000": RFC 5322 says UTC, origin unknown
            parsed = parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)
    except Exception:
        defects.add("date:unparseable")
        return fallback
    reference = _to_utc(received_at) or datetime.now(UTC)
    if parsed < _MIN_DATE or parsed > reference + _MAX_CLOCK_SKEW:
        defects.add("date:out-of-range")
        return fallback
    return _to_ms(parsed)


def _to_utc(value: datetime | None) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except Exception:
        return None


def _safe_received_at(received_at: datetime | None) -> datetime:
    return _to_ms(_to_utc(received_at) or datetime.now(UTC))


def _to_ms(value: datetime) -> datetime:
    # MongoDB stores milliseconds; truncating here keeps round trips equal.
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


# --------------------------------------------------------------------------- ids


def _fallback_id(
    participants: list[dict[str, Any]], date_text: str | None, subject: str | None, text: str
) -> str:
    """Deterministic id for a message without a usable Message-ID.

    Built only from fields that survive re-encoding (line endings, folding),
    so the same message stored in two mailboxes gets the same id.
    """
    sender = next((p["address"] for p in participants if p["role"] == "from"), "")
    recipients = sorted({p["address"] for p in participants if p["role"] in ("to", "cc")})
    canonical = json.dumps(
        [sender, collapse(date_text or ""), subject or "", recipients, text],
        ensure_ascii=True,  # escapes any stray surrogate instead of failing
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _first_id(values: list[str]) -> str | None:
    for value in values:
        ids = extract_ids(value)
        if ids:
            return ids[0]
    return None
