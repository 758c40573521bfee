"""Twilio's JSON in, records out: pure functions, testable with plain data.

Items are validated here; one that cannot become a record raises
``Malformed`` with the reason, and the connector skips it (logged and
counted) without failing the page.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from .base import MalformedItem
from .phones import split_scheme, to_e164

CALL_FINAL = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
CALL_OPEN = frozenset({"queued", "ringing", "in-progress"})
INBOUND = frozenset({"inbound", "trunking-originating"})
OUTBOUND = frozenset({"outbound-api", "outbound-dial", "outbound-call", "outbound-reply", "trunking-terminating"})
# Recordings without audio to point at.
_NO_MEDIA = frozenset({"absent", "deleted"})
_SID = {"call": re.compile(r"^CA[0-9a-fA-F]{32}$"), "message": re.compile(r"^(SM|MM)[0-9a-fA-F]{32}$")}
# Twilio Client identities are our own app's users, never customers.
_OWN_SCHEMES = ("client:",)


class Malformed(MalformedItem, ValueError):
    """An item Twilio returned that cannot become a record; it is skipped with this reason."""


@dataclass(frozen=True, slots=True)
class Options:
    """What normalization needs to know about the account."""

    source: str
    account_sid: str
    region: str | None = None
    own_numbers: frozenset[str] = frozenset()
    max_content_chars: int = 100_000


@dataclass(frozen=True, slots=True)
class Call:
    """The fields of a Twilio call the capture needs, validated."""

    sid: str
    parent: str | None
    status: str
    direction: str
    start: datetime | None
    raw: Mapping[str, Any]

    @property
    def final(self) -> bool:
        return self.status in CALL_FINAL


def parse_time(value: Any, what: str) -> datetime | None:
    """Twilio's RFC 2822 date (or a datetime from a fetched instance) as aware UTC; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            raise Malformed(f"unparseable {what} {value[:40]!r}") from None
    else:
        raise Malformed(f"{what} is a {type(value).__name__}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    parsed = parsed.astimezone(UTC)
    # MongoDB keeps milliseconds.
    return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)


def _sid(item: Any, kind: str) -> str:
    """The item's SID, checked: every list item must be an object with a SID of its kind."""
    if not isinstance(item, Mapping):
        raise Malformed("not an object")
    sid = item.get("sid")
    if not isinstance(sid, str) or not _SID[kind].match(sid):
        raise Malformed(f"no valid {kind} sid")
    return sid


def parse_call(item: Any) -> Call:
    """Validate one item of a Calls list; raise Malformed with the reason."""
    sid = _sid(item, "call")
    status = item.get("status")
    if status not in CALL_FINAL and status not in CALL_OPEN:
        raise Malformed(f"unknown call status {str(status)[:40]!r}")
    direction = item.get("direction")
    if direction not in INBOUND and direction not in OUTBOUND:
        raise Malformed(f"unknown call direction {str(direction)[:40]!r}")
    parent = item.get("parent_call_sid") or None
    if parent is not None and (not isinstance(parent, str) or not _SID["call"].match(parent)):
        raise Malformed("invalid parent_call_sid")
    return Call(sid, parent, status, direction, parse_time(item.get("start_time"), "start_time"), item)


def direction_of(twilio_direction: str) -> str:
    """Twilio's direction ("outbound-dial", ...) as the record's "inbound" or "outbound"."""
    return "inbound" if twilio_direction in INBOUND else "outbound"


def party(raw: Any, role: str, internal: bool, opts: Options) -> dict[str, Any]:
    """One participant: E.164 when the number reads, else kept as written."""
    text = raw.strip() if isinstance(raw, str) else ""
    number = to_e164(text, opts.region)
    address = number or text
    own = internal or (number is not None and number in opts.own_numbers) or address.lower().startswith(_OWN_SCHEMES)
    return {"role": role, "address": address, "name": None, "internal": own}


def sides(item: Mapping[str, Any], direction: str, opts: Options) -> list[dict[str, Any]]:
    """from and to; our side is the `to` of inbound items and the `from` of outbound ones."""
    inbound = direction == "inbound"
    return [party(item.get("from"), "from", not inbound, opts), party(item.get("to"), "to", inbound, opts)]


def external_address(participants: Sequence[Mapping[str, Any]]) -> str | None:
    """The first participant that is not ours (the thread of a phone conversation)."""
    for p in participants:
        if not p["internal"] and p["address"]:
            return p["address"]
    return None


def duration_text(seconds: int) -> str:
    """252 -> "4 min 12 s"."""
    h, rest = divmod(max(0, int(seconds)), 3600)
    m, s = divmod(rest, 60)
    parts = [f"{h} h" if h else "", f"{m} min" if m else "", f"{s} s" if s or not (h or m) else ""]
    return " ".join(p for p in parts if p)


def call_summary(direction: str, status: str, duration_s: int, recordings: int) -> str:
    """A one-line human summary: "Outbound call, 4 min 12 s, completed"."""
    parts = [f"{direction.capitalize()} call"]
    if duration_s:
        parts.append(duration_text(duration_s))
    parts.append(status.replace("-", " "))
    if recordings:
        parts.append(f"{recordings} recording" + ("s" if recordings > 1 else ""))
    return ", ".join(parts)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def recording_entry(item: Mapping[str, Any]) -> dict[str, Any] | None:
    """A recording as the record lists it (no audio is downloaded); None when it has no media."""
    sid = item.get("sid")
    if not isinstance(sid, str) or item.get("status") in _NO_MEDIA:
        return None
    duration = _int(item.get("duration"))
    media = item.get("media_url") or str(item.get("uri") or "").removesuffix(".json")
    return {
        "sid": sid,
        # Twilio reports -1 while the recording is still running.
        "duration_s": duration if duration is not None and duration >= 0 else None,
        "media_path": urlsplit(media).path or None,
    }


def call_record(root: Call, legs: Sequence[Call], recordings: Iterable[Mapping[str, Any]], opts: Options) -> dict[str, Any]:
    """One conversation: the parent call with its child legs and recordings, as a record."""
    if root.start is None:
        raise Malformed("call without start_time")
    item = root.raw
    direction = direction_of(root.direction)
    participants = sides(item, direction, opts)
    # The dialed parties of the legs take part too (a <Dial> to a customer from a
    # click-to-call); staff phones belong in the account's `numbers`.
    # A leg read twice (pages shifting under new calls) is still one leg.
    legs = sorted({leg.sid: leg for leg in legs}.values(), key=_leg_order)
    for leg in legs:
        dialed = party(leg.raw.get("to"), "to", False, opts)
        if dialed["address"] and all(dialed["address"] != p["address"] for p in participants):
            participants.append(dialed)
    seen: set[str] = set()
    entries = []
    for rec in sorted(recordings, key=_recording_order):
        entry = recording_entry(rec)
        if entry is not None and entry["sid"] not in seen:
            seen.add(entry["sid"])
            entries.append(entry)
    duration = max(_int(item.get("duration")) or 0, 0)
    external = external_address(participants)
    return {
        "_id": root.sid,
        "channel": "call",
        "direction": direction,
        "occurred_at": root.start,
        "participants": participants,
        "subject": None,
        "content": call_summary(direction, root.status, duration, len(entries)),
        "content_truncated": False,
        "thread_id": external or participants[1]["address"] or None,
        "attachments": [],
        "sources": [{"kind": "twilio", "source": opts.source, "account_sid": opts.account_sid, "list": "calls"}],
        "call": {
            "status": root.status,
            "duration_s": duration,
            "price": item.get("price"),
            "price_unit": item.get("price_unit"),
            "recordings": entries,
            "legs": [leg.sid for leg in legs],
        },
    }


def _recording_order(item: Mapping[str, Any]) -> tuple[datetime, str]:
    try:
        created = parse_time(item.get("date_created"), "date_created")
    except Malformed:
        created = None
    return (created or datetime.min.replace(tzinfo=UTC), str(item.get("sid")))


def _leg_order(leg: Call) -> tuple[datetime, str]:
    return (leg.start or datetime.max.replace(tzinfo=UTC), leg.sid)


def message_channel(item: Mapping[str, Any]) -> str:
    """"whatsapp" when either side carries the whatsapp: prefix, else "sms" (SMS and MMS)."""
    for key in ("from", "to"):
        value = item.get(key)
        if isinstance(value, str) and split_scheme(value)[0] == "whatsapp":
            return "whatsapp"
    return "sms"


def message_record(item: Any, opts: Options) -> dict[str, Any] | None:
    """One message as a record; None while it has not been sent; Malformed when it cannot be read."""
    sid = _sid(item, "message")
    twilio_direction = item.get("direction")
    if twilio_direction not in INBOUND and twilio_direction not in OUTBOUND:
        raise Malformed(f"unknown message direction {str(twilio_direction)[:40]!r}")
    sent = parse_time(item.get("date_sent"), "date_sent")
    if sent is None:
        return None
    direction = direction_of(twilio_direction)
    participants = sides(item, direction, opts)
    body = item.get("body")
    body = body if isinstance(body, str) else ""
    truncated = len(body) > opts.max_content_chars
    external = external_address(participants)
    return {
        "_id": sid,
        "channel": message_channel(item),
        "direction": direction,
        "occurred_at": sent,
        "participants": participants,
        "subject": None,
        "content": body[: opts.max_content_chars],
        "content_truncated": truncated,
        "thread_id": external or participants[1]["address"] or None,
        "attachments": [],
        "sources": [{"kind": "twilio", "source": opts.source, "account_sid": opts.account_sid, "list": "messages"}],
        "message": {
            "status": item.get("status"),
            "num_media": _int(item.get("num_media")) or 0,
            "num_segments": _int(item.get("num_segments")),
            "price": item.get("price"),
            "price_unit": item.get("price_unit"),
        },
    }


def unreadable_numbers(record: Mapping[str, Any]) -> list[str]:
    """Participants kept as written that look like attempted phone numbers (not client:/sip: identities)."""
    out = []
    for p in record.get("participants", ()):
        address = p.get("address") or ""
        if address and not address.startswith("+") and ":" not in address and any(c.isdigit() for c in address) or address.startswith("+") and to_e164(address) is None:
            out.append(address)
    return out
