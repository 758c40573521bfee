"""Header values as text: raw 8-bit bytes, RFC 2047 encoded words, folding. Pure functions."""

from __future__ import annotations

import binascii
import re
from collections.abc import Collection
from email.message import Message

from .charsets import decode_bytes, decode_utf8_mostly
from .defects import Defects

_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([qQbB])\?(.*?)\?=")
_LINEBREAK = re.compile(r"\r\n?|\n")

Headers = dict[str, list[str]]


def wanted_headers(msg: Message, wanted: Collection[str], defects: Defects) -> Headers:
    """Raw values of the ``wanted`` headers (lowercase names), by lowercase name, in order.

    ``raw_items`` bypasses compat32's header objects, so raw 8-bit bytes stay
    as surrogate escapes we can decode ourselves.
    """
    found: Headers = {}
    try:
        for name, value in msg.raw_items():
            key = name.strip().lower() if isinstance(name, str) else ""
            if key in wanted and isinstance(value, str):
                found.setdefault(key, []).append(value)
    except Exception:
        defects.add("headers:unreadable")
    return found


def unfold(value: str, hint: str | None) -> str:
    """Header value as clean text: 8-bit bytes decoded, line breaks removed."""
    if not value.isascii():
        value = decode_8bit_header(value, hint)
    if "\n" in value or "\r" in value:
        value = _LINEBREAK.sub("", value)
    return value.replace("\x00", "")


def decode_8bit_header(value: str, hint: str | None) -> str:
    """Decode raw 8-bit header bytes (surrogate-escaped by the parser).

    UTF-8 first (RFC 6532 and most modern senders), also when one sequence in
    it is broken (a name cut short by a client): only those bytes are lost.
    Then the charset the body declares (old clients wrote headers in it), then
    Windows-1252, and Latin-1 as the last resort because it cannot fail.
    """
    data = value.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = decode_utf8_mostly(data)
    if text is not None:
        return text
    for codec in (hint, "cp1252"):
        if codec:
            try:
                return data.decode(codec)
            except Exception:
                continue
    return data.decode("latin-1")


def first(headers: Headers, name: str, hint: str | None) -> str | None:
    """The first value of header ``name``, unfolded; None when absent."""
    values = headers.get(name)
    return unfold(values[0], hint) if values else None


def all_values(headers: Headers, name: str, hint: str | None) -> list[str]:
    """Every value of header ``name``, unfolded, in order."""
    return [unfold(v, hint) for v in headers.get(name, ())]


def collapse(text: str) -> str:
    """Runs of whitespace as one space, none at the ends."""
    return " ".join(text.split())


def _decode_words(text: str, defects: Defects) -> str:
    """Decode RFC 2047 encoded words.

    Hand-rolled rather than ``email.header.decode_header``/``make_header``:
    those turn raw 8-bit text into literal ``\\udcxx`` escapes, raise on unknown
    charsets and bad base64, and cannot fall back per word. Adjacent words in
    the same charset are joined before decoding because senders split
    multi-byte characters across words.
    """
    if "=?" not in text:
        return text
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    pos = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(decode_bytes(bytes(pending), pending_charset, defects))
            pending.clear()
            pending_charset = None

    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        charset = match.group(1).split("*", 1)[0]
        data = _decode_word_payload(match.group(2), match.group(3))
        pos = match.end()
        if data is None:
            defects.add("header:bad-encoded-word")
            flush()
            out.append(gap + match.group(0))
            continue
        # Whitespace between two encoded words is not part of the text.
        if pending_charset is None or (gap and not gap.isspace()):
            flush()
            out.append(gap)
        elif charset.lower() != pending_charset.lower():
            flush()
        if pending_charset is None:
            pending_charset = charset
        pending += data
    flush()
    out.append(text[pos:])
    return "".join(out)


def _decode_word_payload(encoding: str, payload: str) -> bytes | None:
    try:
        data = payload.encode("utf-8", "surrogateescape")
        if encoding in "qQ":
            return binascii.a2b_qp(data, header=True)
        data = data.strip()
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except Exception:
        return None


def header_text(value: str | None, defects: Defects) -> str | None:
    """Decoded, whitespace-collapsed header text, or None when empty."""
    if value is None:
        return None
    try:
        text = collapse(_decode_words(value, defects))
    except Exception:
        defects.add("header:decode-failed")
        text = collapse(value)
    return text or None


def subject_text(headers: Headers, hint: str | None, defects: Defects, max_chars: int) -> tuple[str | None, bool]:
    """The decoded Subject, at most ``max_chars``; and whether it was cut."""
    values = headers.get("subject")
    if not values:
        return None, False
    # Decoding never makes text longer than its source, so a generous cut of the
    # source first keeps an 18 MB Subject cheap.
    limit = 8 * max_chars
    text = header_text(unfold(values[0][:limit], hint), defects)
    if text is not None and len(text) > max_chars:
        return text[:max_chars], True
    return text, len(values[0]) > limit

