"""Email normalization: raw RFC 822 bytes in, one commsync record dict out.

This module is pure (no I/O) and must never raise: mailboxes contain decades of
broken mail, and one unreadable message must not stall a sync. Every risky step
is wrapped on its own, so a bad part costs only that part, and what went wrong
is recorded in the record's ``parse_defects``.

Speed matters (initial syncs of large mailboxes), so the message is parsed with
the fast ``compat32`` policy and only the pieces the record needs are decoded:
a handful of headers and one body part. Bodies are not even read line by line:
``_FastParser`` builds the stdlib parser's Message tree by slicing them at
boundary lines. Attachment payloads are never decoded; their size is estimated
from the encoded length.
"""

from __future__ import annotations

import binascii
import codecs
import hashlib
import html as html_lib
import json
import re
from datetime import UTC, datetime, timedelta
from email import errors, policy
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from functools import lru_cache
from typing import Any

__all__ = ["extract_ids", "normalize_email", "normalize_message_id"]

_PARSER = BytesParser(policy=policy.compat32)

_MAX_DEFECTS = 20
_MAX_ID_CHARS = 998  # longer "ids" are junk and would bloat the _id index
_HASH_CONTENT_CHARS = 4096
_MIN_DATE = datetime(1980, 1, 1, tzinfo=UTC)
_MAX_CLOCK_SKEW = timedelta(days=2)

_ADDRESS_ROLES = {
    "from": "from",
    "sender": "sender",
    "reply-to": "reply_to",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
}
# Headers that mark mail a machine sent (RFC 3834 auto-replies, RFC 2919 lists,
# bulk senders, RFC 2369/8058 newsletters); see `_automated_by`.
_AUTOMATION_HEADERS = ("auto-submitted", "list-id", "precedence", "list-unsubscribe")
_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply"})
_WANTED_HEADERS = frozenset(
    {*_ADDRESS_ROLES, "subject", "date", "message-id", "in-reply-to", "references", *_AUTOMATION_HEADERS}
)

_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([qQbB])\?(.*?)\?=")
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_LINEBREAK = re.compile(r"\r\n?|\n")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){3,}")
_CHARSET_TOKEN = re.compile(r"[A-Za-z0-9_.:+-]+")
_META_CHARSET = re.compile(rb"<meta[^>]{0,200}?charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:+-]+)", re.I)
_HTML_DROP = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.I | re.S)
_HTML_BREAK = re.compile(r"<(?:br|/p|/div|/tr|/li|/h[1-6])\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]*>")
_BARE_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"']+@[^\s<>()\[\],;:\"']+")

# Labels that real mail uses for a superset encoding. Decoding with the superset
# is what mail clients and browsers do (WHATWG Encoding Standard), and it turns
# "undecodable" bytes from Outlook & co. into the characters the sender saw.
_CODEC_SUPERSETS = {
    "ascii": "cp1252",
    "iso8859-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "euc_kr": "cp949",
    "shift_jis": "cp932",
}
_LABEL_ALIASES = {
    "x-sjis": "shift_jis",
    "x-gbk": "gbk",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "unicode-1-1-utf-7": "utf-7",
    "x-mac-roman": "mac-roman",
    "utf8mb4": "utf-8",
}
# Western single-byte labels are the ones most often slapped on UTF-8 bodies;
# multi-byte UTF-8 sequences almost never occur by accident in real Latin-1
# text, so for these labels UTF-8 is tried first.
_WESTERN_CODECS = frozenset({"cp1252", "iso8859-15"})


class _Defects:
    """Ordered, deduplicated, capped list of short problem descriptions."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        if text not in self.items and len(self.items) < _MAX_DEFECTS:
            self.items.append(text)


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
    result: list[str] = []
    for token in tokens:
        mid = normalize_message_id(token)
        if mid and mid not in result:
            result.append(mid)
    return result


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
    defects = _Defects()
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
    defects: _Defects,
    *,
    own: frozenset[str],
    domains: frozenset[str],
    received_at: datetime | None,
    max_chars: int,
    truncated_fetch: bool,
) -> dict[str, Any]:
    msg = _parse(raw, defects)
    body = _Body(msg, defects, max_chars) if msg is not None else _Body.empty()
    headers = _wanted_headers(msg, defects) if msg is not None else {}
    hint = body.charset_hint

    participants = _participants(headers, hint, own, domains, defects)
    subject = _subject(headers, hint, defects)
    date_text = _first(headers, "date", hint)
    occurred_at = _occurred_at(date_text, received_at, defects)

    message_id = normalize_message_id(_first(headers, "message-id", hint))
    if message_id is None:
        defects.add("message-id:missing")
    in_reply_to = _first_id(_all(headers, "in-reply-to", hint))
    references = extract_ids(" ".join(_all(headers, "references", hint)))

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
    }


def _automated_by(headers: dict[str, list[str]], hint: str | None) -> list[str]:
    """The automation headers that mark this message as sent by a machine, in a fixed order."""
    found = []
    auto = (_first(headers, "auto-submitted", hint) or "").split(";")[0].strip().lower()
    if auto and auto != "no":
        found.append("auto-submitted")
    if (_first(headers, "list-id", hint) or "").strip():
        found.append("list-id")
    if (_first(headers, "precedence", hint) or "").strip().lower() in _BULK_PRECEDENCE:
        found.append("precedence")
    if (_first(headers, "list-unsubscribe", hint) or "").strip():
        found.append("list-unsubscribe")
    return found


def _minimal_record(
    raw: bytes, defects: _Defects, received_at: datetime | None, truncated_fetch: bool
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
    }


def _as_bytes(raw: Any, defects: _Defects) -> bytes:
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


def _parse(raw: bytes, defects: _Defects) -> Message | None:
    try:
        return _FastParser(raw.decode("ascii", "surrogateescape")).parse()
    except Exception:
        # _Fallback, or a bug: the stdlib parser decides (and may fail the same way).
        pass
    try:
        return _PARSER.parsebytes(raw)
    except Exception as exc:
        defects.add(f"parse:failed:{type(exc).__name__}")
        return None


def _collect_parser_defects(parts: list[Message], defects: _Defects) -> None:
    for part in parts:
        for defect in getattr(part, "defects", ()):
            defects.add(type(defect).__name__)


def _content_cap(value: Any) -> int:
    try:
        return max(0, int(value))
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


# --------------------------------------------------------------------------- parsing


class _Part(Message):
    """A compat32 Message that reads its headers and parameters only once.

    The record needs each part's content type, disposition, transfer encoding,
    charset, filename and boundary, and every ``get``/``get_param`` scans all
    headers (or parses the whole Content-Type) again. Only ``_FastParser``
    builds these, and reads them once their headers are complete; nothing
    changes the headers afterwards (``set_param`` and friends would make
    the cached answers stale: not used), so the answers are kept.
    """

    def _memo(self) -> dict[Any, Any]:
        try:
            return self._cs_memo  # type: ignore[has-type,no-any-return]
        except AttributeError:
            memo = self._cs_memo = {"names": [name.lower() for name, _ in self._headers]}
            return memo

    def get(self, name: str, failobj: Any = None) -> Any:
        try:
            index = self._memo()["names"].index(name.lower())
        except ValueError:
            return failobj
        return self.policy.header_fetch_parse(*self._headers[index])

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._memo()["names"]

    def get_content_type(self) -> str:
        memo = self._memo()
        ctype = memo.get("ctype")
        if ctype is None:
            ctype = memo["ctype"] = Message.get_content_type(self)
        return ctype  # type: ignore[no-any-return]

    def get_param(self, param: str, failobj: Any = None, header: str = "content-type", unquote: bool = True) -> Any:
        memo = self._memo()
        key = ("param", param.lower(), header.lower(), unquote)
        value = memo.get(key, _NOT_PARSED)
        if value is _NOT_PARSED:
            value = memo[key] = Message.get_param(self, param, _NO_VALUE, header, unquote)
        return failobj if value is _NO_VALUE else value

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        memo = self._memo()
        key = ("params", header.lower())
        params = memo.get(key, _NOT_PARSED)
        if params is _NOT_PARSED:
            params = memo[key] = Message._get_params_preserve(self, _NO_VALUE, header)
        return failobj if params is _NO_VALUE else params


_NOT_PARSED = object()
_NO_VALUE = object()

# email.feedparser's header-line test (headerRE), extended to the whole line.
_HEADER_LINE = re.compile(r"(?:From |[\041-\071\073-\176]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n)?")
_HEADER_LINES = re.compile(r"(?:(?:From |[\041-\071\073-\176]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n)?)*")
# One whole field (name, value as compat32's header_source_parse cuts it, before
# the final rstrip) of a header block without the lines _odd_header_lines looks for.
_HEADER_FIELD = re.compile(r"([\041-\071\073-\176]+):[ \t]*([^\r\n]*(?:\r\n|\r|\n)?(?:[ \t][^\r\n]*(?:\r\n|\r|\n)?)*)")
_BLANK_LINE_START = re.compile(r"(?:(?<=\n)|(?<=\r)(?!\n))[\r\n]")
# On the EOF stack, the feedparser's blank-line matcher (message/delivery-status
# blocks). No boundary separator has a line break in it.
_BLANK_LINE = "\n"
_MAX_FAST_DEPTH = 40  # deeper nesting goes to the stdlib parser, with its own limits


class _Fallback(Exception):
    """Input the fast parser does not reproduce exactly: use the stdlib parser."""


def _eol_len(text: str) -> int:
    """Length of the line break that ends ``text`` (feedparser's NLCRE_eol)."""
    if text.endswith("\r\n"):
        return 2
    return 1 if text.endswith(("\r", "\n")) else 0


class _FastParser:
    """The stdlib compat32 parser's result, without reading bodies line by line.

    ``BytesParser(policy=compat32)`` feeds every line of every part, base64
    attachments included, through ``email.feedparser``, and compiles a regex
    per multipart boundary. This is a port of ``FeedParser._parsegen``
    (CPython 3.11-3.13) that works on positions in the decoded text instead:
    header blocks are still split into lines and parsed as there, but a body
    is one slice up to the line that ends it, i.e. the first line that one of
    the enclosing multiparts' boundary patterns (the feedparser's EOF-matcher
    stack) matches, found with ``str.find``. It builds the same Message tree:
    same headers, payload strings, preambles, epilogues and defects. The few
    constructs it does not port raise ``_Fallback`` (a "From " line ending a
    header block, a boundary with a line break in it, very deep nesting).
    """

    __slots__ = ("cur", "depth", "found", "last", "length", "pos", "stack", "text", "trail")

    def __init__(self, text: str) -> None:
        self.text = text
        self.length = len(text)
        self.pos = 0
        self.stack: list[str] = []  # "--" + boundary of each enclosing multipart being read
        self.found: dict[str, tuple[int, int]] = {}  # separator -> (searched from, first hit)
        self.trail: list[Message] = []  # feedparser's _msgstack
        self.cur: Message | None = None
        self.last: Message | None = None
        self.depth = 0

    def parse(self) -> Message:
        self._entity()
        root = self._pop()
        if root.get_content_maintype() == "multipart" and not root.is_multipart():
            root.defects.append(errors.MultipartInvariantViolationDefect())
        return root

    # -- lines

    def _boundary_line(self, at: int, sep: str) -> tuple[bool, int, bool] | None:
        """Match the line starting at ``at`` (which starts with ``sep``) like the
        feedparser's ``--boundary(--)?[ \\t]*(\\r\\n|\\r|\\n)?$`` does.

        Returns (closing delimiter, end of the line, has a line break), or None.
        """
        text, length = self.text, self.length
        j = at + len(sep)
        close = text.startswith("--", j)
        if close:
            j += 2
        while j < length and (text[j] == " " or text[j] == "\t"):
            j += 1
        if j == length:
            return close, j, False
        char = text[j]
        if char == "\n":
            return close, j + 1, True
        if char == "\r":
            return close, j + 2 if text.startswith("\n", j + 1) else j + 1, True
        return None

    def _next(self, sep: str, pos: int) -> int:
        """Start of the first line at/after ``pos`` that ``sep``'s pattern matches, else the end."""
        hit = self.found.get(sep)
        if hit is not None and hit[0] <= pos <= hit[1]:
            return hit[1]  # positions only move forward, so an earlier search still holds
        text = self.text
        if sep == _BLANK_LINE:
            at = self._next_blank(pos)
            self.found[sep] = (pos, at)
            return at
        at = text.find(sep, pos)
        while at >= 0:
            if (at == 0 or text[at - 1] in "\r\n") and self._boundary_line(at, sep) is not None:
                break
            at = text.find(sep, at + 1)
        else:
            at = self.length
        self.found[sep] = (pos, at)
        return at

    def _next_blank(self, pos: int) -> int:
        """Start of the first empty line at/after ``pos`` (a line start), else the end."""
        if pos < self.length and self.text[pos] in "\r\n":
            return pos
        match = _BLANK_LINE_START.search(self.text, pos)
        return match.start() if match else self.length

    def _eof(self, pos: int) -> int:
        """Where the current entity ends: the first line an enclosing boundary claims."""
        end = self.length
        for sep in self.stack:
            at = self._next(sep, pos)
            if at < end:
                end = at
        return end

    # -- messages

    def _new(self) -> Message:
        msg = _Part()
        cur = self.cur
        if cur is not None and cur.get_content_type() == "multipart/digest":
            msg.set_default_type("message/rfc822")
        if self.trail:
            self.trail[-1].attach(msg)
        self.trail.append(msg)
        self.cur = self.last = msg
        return msg

    def _pop(self) -> Message:
        msg = self.trail.pop()
        self.cur = self.trail[-1] if self.trail else None
        return msg

    def _entity(self) -> None:
        """One message or body part: headers, then the body (feedparser's _parsegen)."""
        self.depth += 1
        if self.depth > _MAX_FAST_DEPTH:
            raise _Fallback
        msg = self._new()
        text, start = self.text, self.pos
        limit = self._eof(start)
        end = block_end = _HEADER_LINES.match(text, start, limit).end()
        if end < limit:  # the line after the headers: blank, or the first body line
            char = text[end]
            if char == "\n":
                end += 1
            elif char == "\r":
                end += 2 if text.startswith("\n", end + 1) else 1
            else:
                msg.defects.append(errors.MissingHeaderBodySeparatorDefect())
        self.pos = end
        if block_end > start:
            if text[start] in " \t" or text.startswith(("From ", ":"), start) or _odd_header_lines(text, start, block_end):
                self._headers(msg, _HEADER_LINE.findall(text, start, block_end))
            else:  # every line is a "Name: value" field or continues one
                msg._headers = [(name, value.rstrip("\r\n")) for name, value in _HEADER_FIELD.findall(text, start, block_end)]
        ctype = msg.get_content_type()
        maintype = ctype.split("/")[0]
        if ctype == "message/delivery-status":
            self._status_blocks()
        elif maintype == "message":
            self._entity()
            self._pop()
        elif maintype == "multipart":
            self._multipart(msg)
        else:
            body_end = self._eof(self.pos)
            msg._payload = text[self.pos : body_end]
            self.pos = body_end
        self.depth -= 1

    def _status_blocks(self) -> None:
        """message/delivery-status: header blocks separated by blank lines, one Message each."""
        while True:
            self.stack.append(_BLANK_LINE)
            self._entity()
            self._pop()
            self.stack.pop()
            pos = self.pos
            if self._eof(pos) != pos:  # read (and drop) the blank line
                match = _LINEBREAK.search(self.text, pos)
                pos = match.end() if match else self.length
            self.pos = pos
            if self._eof(pos) == pos:
                return

    @staticmethod
    def _headers(msg: Message, lines: list[str]) -> None:
        """feedparser's _parse_headers."""
        value: list[str] | None = None
        headers = msg._headers
        for lineno, line in enumerate(lines):
            if line[0] in " \t":
                if value is None:
                    msg.defects.append(errors.FirstHeaderLineIsContinuationDefect(line))
                else:
                    value.append(line)
                continue
            if value is not None:
                headers.append(_header_source_parse(value))
                value = None
            if line.startswith("From "):
                if lineno == 0:
                    msg.set_unixfrom(line[: len(line) - _eol_len(line)])
                    continue
                if lineno == len(lines) - 1:
                    raise _Fallback  # pushed back into the body, after the blank line
                msg.defects.append(errors.MisplacedEnvelopeHeaderDefect(line))
                continue
            colon = line.find(":")
            if colon == 0:
                msg.defects.append(errors.InvalidHeaderDefect("Missing header name."))
                continue
            if colon < 0:
                raise _Fallback
            value = [line]
        if value is not None:
            headers.append(_header_source_parse(value))

    def _multipart(self, msg: Message) -> None:
        text = self.text
        boundary = msg.get_boundary()
        if boundary is None:
            msg.defects.append(errors.NoBoundaryInMultipartDefect())
            body_end = self._eof(self.pos)
            msg._payload = text[self.pos : body_end]
            self.pos = body_end
            return
        if str(msg.get("content-transfer-encoding", "8bit")).lower() not in ("7bit", "8bit", "binary"):
            msg.defects.append(errors.InvalidMultipartContentTransferEncodingDefect())
        sep = "--" + boundary
        if "\r" in sep or "\n" in sep:
            raise _Fallback
        start = pos = self.pos
        stop = pos  # end of the preamble
        capturing_preamble = True
        close_seen = has_linesep = False
        while True:
            eof = self._eof(pos)  # this multipart's own boundary is not on the stack yet
            own = self._next(sep, pos)
            if capturing_preamble:
                if own >= eof:  # an enclosing boundary (or the end) comes first, or claims the line
                    stop = pos = eof
                    break
                stop = own
                match = self._boundary_line(own, sep)
                assert match is not None
                if match[0]:
                    close_seen, has_linesep, pos = True, match[2], match[1]
                    break
                if own > start:
                    preamble = text[start:own]
                    msg.preamble = preamble[: len(preamble) - _eol_len(preamble)]
                capturing_preamble = False
                pos = own
                continue
            if eof == pos:
                break
            if own != pos:
                raise _Fallback  # cannot happen: a part ends at a boundary line or the end
            match = self._boundary_line(pos, sep)
            assert match is not None
            if match[0]:
                close_seen, has_linesep, pos = True, match[2], match[1]
                break
            pos = match[1]
            # Consecutive boundary lines enclose no part.
            while self._eof(pos) != pos and self._next(sep, pos) == pos:
                match = self._boundary_line(pos, sep)
                assert match is not None
                pos = match[1]
            self.stack.append(sep)
            self.pos = pos
            self._entity()
            # The line break before a boundary belongs to the boundary.
            last = self.last
            assert last is not None
            if last.get_content_maintype() == "multipart":
                epilogue = last.epilogue
                if epilogue == "":
                    last.epilogue = None
                elif epilogue is not None and _eol_len(epilogue):
                    last.epilogue = epilogue[: -_eol_len(epilogue)]
            else:
                payload = last._payload
                if isinstance(payload, str) and _eol_len(payload):
                    last._payload = payload[: -_eol_len(payload)]
            self.stack.pop()
            self._pop()
            self.last = self.cur
            pos = self.pos
        if capturing_preamble:
            msg.defects.append(errors.StartBoundaryNotFoundDefect())
            msg._payload = text[start:stop]
            msg.epilogue = ""
            self.pos = self._eof(pos)  # the rest is read and dropped
            return
        if not close_seen:
            msg.defects.append(errors.CloseBoundaryNotFoundDefect())
            self.pos = pos
            return
        body_end = self._eof(pos)
        if not has_linesep and body_end != pos:
            raise _Fallback  # cannot happen: only the last line lacks a line break
        msg.epilogue = text[pos:body_end] if has_linesep else ""
        self.pos = body_end


def _odd_header_lines(text: str, start: int, end: int) -> bool:
    """Whether a line after the first of text[start:end] starts with "From " or ":"."""
    return any(text.find(mark, start, end) >= 0 for mark in ("\nFrom ", "\rFrom ", "\n:", "\r:"))


def _header_source_parse(lines: list[str]) -> tuple[str, str]:
    """compat32's header_source_parse: (name, value) of one header's raw lines."""
    name, value = lines[0].split(":", 1)
    value = value.lstrip(" \t") + "".join(lines[1:])
    return name, value.rstrip("\r\n")


# --------------------------------------------------------------------------- headers


def _wanted_headers(msg: Message, defects: _Defects) -> dict[str, list[str]]:
    """Raw values of the headers the record needs, by lowercase name, in order.

    ``raw_items`` bypasses compat32's header objects, so raw 8-bit bytes stay
    as surrogate escapes we can decode ourselves.
    """
    found: dict[str, list[str]] = {}
    try:
        for name, value in msg.raw_items():
            key = name.strip().lower() if isinstance(name, str) else ""
            if key in _WANTED_HEADERS and isinstance(value, str):
                found.setdefault(key, []).append(value)
    except Exception:
        defects.add("headers:unreadable")
    return found


def _unfold(value: str, hint: str | None) -> str:
    """Header value as clean text: 8-bit bytes decoded, line breaks removed."""
    if not value.isascii():
        value = _decode_8bit_header(value, hint)
    if "\n" in value or "\r" in value:
        value = _LINEBREAK.sub("", value)
    return value.replace("\x00", "")


def _decode_8bit_header(value: str, hint: str | None) -> str:
    """Decode raw 8-bit header bytes (surrogate-escaped by the parser).

    UTF-8 first (RFC 6532 and most modern senders), then the charset the body
    declares (old clients wrote headers in it), then Windows-1252, and Latin-1
    as the last resort because it cannot fail.
    """
    data = value.encode("utf-8", "surrogateescape")
    for codec in ("utf-8", hint, "cp1252"):
        if codec:
            try:
                return data.decode(codec)
            except Exception:
                continue
    return data.decode("latin-1")


def _first(headers: dict[str, list[str]], name: str, hint: str | None) -> str | None:
    values = headers.get(name)
    return _unfold(values[0], hint) if values else None


def _all(headers: dict[str, list[str]], name: str, hint: str | None) -> list[str]:
    return [_unfold(v, hint) for v in headers.get(name, ())]


def _first_id(values: list[str]) -> str | None:
    for value in values:
        ids = extract_ids(value)
        if ids:
            return ids[0]
    return None


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _decode_words(text: str, defects: _Defects) -> str:
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
            out.append(_decode_bytes(bytes(pending), pending_charset, defects))
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


def _header_text(value: str | None, defects: _Defects) -> str | None:
    """Decoded, whitespace-collapsed header text, or None when empty."""
    if value is None:
        return None
    try:
        text = _collapse(_decode_words(value, defects))
    except Exception:
        defects.add("header:decode-failed")
        text = _collapse(value)
    return text or None


def _subject(headers: dict[str, list[str]], hint: str | None, defects: _Defects) -> str | None:
    return _header_text(_first(headers, "subject", hint), defects)


# --------------------------------------------------------------------------- participants


def _participants(
    headers: dict[str, list[str]],
    hint: str | None,
    own: frozenset[str],
    domains: frozenset[str],
    defects: _Defects,
) -> list[dict[str, Any]]:
    """Address-header entries in header order, deduplicated by (role, address)."""
    result: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for name, role in _address_headers_in_order(headers):
        for value in headers[name]:
            for display, addr in _parse_addresses(_unfold(value, hint), defects):
                address = _clean_address(addr)
                if address is None or (role, address) in seen:
                    continue
                seen.add((role, address))
                result.append(
                    {
                        "role": role,
                        "address": address,
                        "name": _header_text(display, defects) if display else None,
                        "internal": _is_internal(address, own, domains),
                    }
                )
    return result


def _address_headers_in_order(headers: dict[str, list[str]]) -> list[tuple[str, str]]:
    # dicts keep insertion order, i.e. the order the headers first appeared.
    return [(name, _ADDRESS_ROLES[name]) for name in headers if name in _ADDRESS_ROLES]


def _parse_addresses(value: str, defects: _Defects) -> list[tuple[str, str]]:
    """(display name, addr-spec) pairs of one address header value."""
    pairs = _getaddresses(value)
    if "@" not in value or _plausible(pairs):
        return pairs
    # Python >= 3.11.10/3.12.6 parse strictly and give up on the whole header;
    # the lenient parser still recovers the plausible addresses.
    pairs = _getaddresses(value, strict=False)
    if _plausible(pairs):
        return pairs
    # Space-separated lists and similar junk make the RFC parser glue or halve
    # addresses; scanning for addr-specs loses only the display names.
    defects.add("address:malformed")
    return [("", addr) for addr in _BARE_ADDRESS.findall(value)]


def _getaddresses(value: str, strict: bool = True) -> list[tuple[str, str]]:
    if len(value) > _ADDRESS_CACHE_CHARS:
        return list(_getaddresses_uncached(value, strict))
    return list(_getaddresses_cached(value, strict))


def _getaddresses_uncached(value: str, strict: bool) -> tuple[tuple[str, str], ...]:
    try:
        # strict=True is the default where the argument exists.
        pairs = getaddresses([value]) if strict else getaddresses([value], strict=False)
        return tuple(pairs)
    except Exception:  # includes TypeError: no strict= before 3.11.10
        return ()


# The same From/To values come back message after message (correspondents, the
# mailbox's own address) and the stdlib address parser is slow pure Python.
_ADDRESS_CACHE_CHARS = 300
_getaddresses_cached = lru_cache(maxsize=2048)(_getaddresses_uncached)


def _plausible(pairs: list[tuple[str, str]]) -> bool:
    """At least one usable address and no mangled one (an '@' but no local/domain)."""
    usable = [_clean_address(addr) is not None for _, addr in pairs]
    return any(usable) and all(ok or "@" not in addr for ok, (_, addr) in zip(usable, pairs, strict=True))


def _clean_address(addr: str) -> str | None:
    address = "".join(addr.split()).strip("<>").lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return address


def _is_internal(address: str, own: frozenset[str], domains: frozenset[str]) -> bool:
    return address in own or address.rpartition("@")[2] in domains


# --------------------------------------------------------------------------- dates


def _occurred_at(
    date_text: str | None, received_at: datetime | None, defects: _Defects
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
        [sender, _collapse(date_text or ""), subject or "", recipients, text],
        ensure_ascii=True,  # escapes any stray surrogate instead of failing
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------- body


class _Body:
    """Readable text and attachment metadata of a parsed message."""

    __slots__ = ("attachments", "charset_hint", "hash_text", "text", "truncated", "visited")

    def __init__(self, msg: Message | None, defects: _Defects, max_chars: int) -> None:
        self.text = ""
        self.hash_text = ""
        self.truncated = False
        self.attachments: list[dict[str, Any]] = []
        self.charset_hint: str | None = None
        self.visited: list[Message] = []
        if msg is not None:
            self._fill(msg, defects, max_chars)

    @classmethod
    def empty(cls) -> _Body:
        return cls(None, _Defects(), 0)

    def _fill(self, msg: Message, defects: _Defects, max_chars: int) -> None:
        leaves = _leaves(msg, self.visited)
        self.charset_hint = _first_charset(leaves)
        for leaf in leaves:
            leaf.filename = _filename(leaf.part, self.charset_hint, defects)
        chosen, text, cut = _choose_body(leaves, defects, max_chars)
        # Normalizing megabytes only to throw them away wastes time; the slack
        # keeps newline/blank-line collapsing from shrinking it below the cap.
        limit = max(2 * max_chars, 4 * _HASH_CONTENT_CHARS) + 1024
        if len(text) > limit:
            text, cut = text[:limit], True
        normalized = _normalize_text(text)
        self.hash_text = _collapse(normalized[: _HASH_CONTENT_CHARS * 4])[:_HASH_CONTENT_CHARS]
        self.truncated = cut or len(normalized) > max_chars
        self.text = normalized[:max_chars]
        self.attachments = _attachments(leaves, chosen, defects)


class _Leaf:
    """A non-container part with the metadata needed to classify it."""

    __slots__ = ("ctype", "disposition", "filename", "part")

    def __init__(self, part: Message, ctype: str, disposition: str | None) -> None:
        self.part = part
        self.ctype = ctype
        self.disposition = disposition
        self.filename: str | None = None


def _leaves(msg: Message, visited: list[Message]) -> list[_Leaf]:
    """Leaf parts in document order; message/* parts are leaves (not entered)."""
    leaves: list[_Leaf] = []
    stack = [msg]
    while stack:  # iterative: hostile nesting depth must not hit the recursion limit
        part = stack.pop()
        visited.append(part)
        ctype = _content_type(part)
        if part.is_multipart() and not ctype.startswith("message/"):
            stack.extend(p for p in reversed(part.get_payload()) if isinstance(p, Message))
            continue
        if ctype.startswith("multipart/"):
            # A "multipart" without usable boundaries: its body is plain text.
            ctype = "text/plain"
        leaves.append(_Leaf(part, ctype, _disposition(part)))
    return leaves


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "text/plain"


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception:
        return None


def _filename(part: Message, hint: str | None, defects: _Defects) -> str | None:
    """Attachment filename, RFC 2231 and RFC 2047 decoded."""
    try:
        name = _param_view(part, hint).get_filename()
    except Exception:
        defects.add("attachment:bad-filename")
        return None
    if not isinstance(name, str):
        return None
    return _header_text(_unfold(name, hint), defects)


def _param_view(part: Message, hint: str | None) -> Message:
    """The part itself, or a copy of its MIME headers with 8-bit bytes decoded.

    compat32 turns header values holding raw 8-bit bytes into Header objects
    whose text is already mangled into U+FFFD, so decode those bytes first.
    """
    mime_headers = [
        (name, value)
        for name, value in part.raw_items()
        if name.lower() in ("content-type", "content-disposition")
    ]
    if all(value.isascii() for _, value in mime_headers):
        return part
    view = Message()
    for name, value in mime_headers:
        view[name] = _decode_8bit_header(value, hint)
    return view


def _declared_charset(part: Message) -> str | None:
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    return charset if isinstance(charset, str) and charset.strip() else None


def _first_charset(leaves: list[_Leaf]) -> str | None:
    """Codec of the first declared text charset: a hint for raw 8-bit headers."""
    for leaf in leaves:
        if leaf.ctype.startswith("text/"):
            codec = _codec(_declared_charset(leaf.part))
            if codec:
                return codec
    return None


def _choose_body(
    leaves: list[_Leaf], defects: _Defects, max_chars: int
) -> tuple[_Leaf | None, str, bool]:
    """Pick the body: first non-blank inline text/plain, else first inline text/html.

    Returns (chosen leaf, text, whether the source was cut before converting).
    """
    inline = [leaf for leaf in leaves if leaf.disposition != "attachment"]
    plain = next((leaf for leaf in inline if leaf.ctype == "text/plain"), None)
    if plain is not None:
        text = _part_text(plain, defects)
        if text and not text.isspace():
            return plain, text, False
    html_leaf = next((leaf for leaf in inline if leaf.ctype == "text/html"), None)
    if html_leaf is not None:
        text, cut = _html_to_text(_part_text(html_leaf, defects), max_chars, defects)
        return html_leaf, text, cut
    return plain, "", False


def _part_text(leaf: _Leaf, defects: _Defects) -> str:
    try:
        data = leaf.part.get_payload(decode=True)
    except Exception:
        defects.add("content:decode-failed")
        return ""
    if not isinstance(data, bytes):
        return ""
    charset = _declared_charset(leaf.part)
    if charset is None and leaf.ctype == "text/html":
        charset = _sniff_html_charset(data)
    try:
        return _decode_bytes(data, charset, defects)
    except Exception:
        defects.add("content:decode-failed")
        return ""


def _sniff_html_charset(data: bytes) -> str | None:
    match = _META_CHARSET.search(data, 0, 2048)
    return match.group(1).decode("ascii") if match else None


def _html_to_text(html: str, max_chars: int, defects: _Defects) -> tuple[str, bool]:
    """Readable text of an HTML body; (text, whether the HTML was cut first)."""
    html = html.replace("\x00", "")
    # Markup is mostly tags, but converting a multi-megabyte newsletter only to
    # keep the first max_chars of it is wasted time.
    limit = max(10 * max_chars, 100_000)
    cut = len(html) > limit
    if cut:
        html = html[:limit]
    if not html.strip():
        return "", cut
    try:
        from inscriptis import get_text  # deferred: lxml import is slow and often unneeded

        return get_text(html), cut
    except Exception:
        defects.add("content:html-failed")
        return _strip_tags(html), cut


def _strip_tags(html: str) -> str:
    """Crude fallback when inscriptis/lxml rejects the markup."""
    try:
        text = _HTML_BREAK.sub("\n", _HTML_DROP.sub(" ", html))
        return html_lib.unescape(_HTML_TAG.sub("", text))
    except Exception:
        return ""


def _normalize_text(text: str) -> str:
    """Strip NULs/BOM, use \\n newlines, keep at most two blank lines in a row."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    if "\r" in text:
        text = _LINEBREAK.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n\n", text)
    return text.lstrip("\ufeff").strip()


def _attachments(leaves: list[_Leaf], chosen: _Leaf | None, defects: _Defects) -> list[dict]:
    """Metadata of parts a mail client would show as attachments."""
    result = []
    for leaf in leaves:
        if leaf is chosen:
            continue
        if leaf.disposition == "attachment" or leaf.filename or not leaf.ctype.startswith("text/"):
            result.append(
                {
                    "filename": leaf.filename,
                    "content_type": leaf.ctype,
                    "size": _estimated_size(leaf.part, defects),
                }
            )
    return result


def _estimated_size(part: Message, defects: _Defects) -> int:
    """Decoded size of a part, estimated without decoding it."""
    try:
        # The raw payload, not get_payload(): that re-encodes 8-bit data first.
        payload = part._payload
        if isinstance(payload, list):
            return sum(_message_size(p) for p in payload if isinstance(p, Message))
        if not isinstance(payload, str):
            return 0
        cte = str(part.get("content-transfer-encoding", "")).strip().lower()
        return _decoded_length(payload, cte)
    except Exception:
        defects.add("attachment:size-unknown")
        return 0


def _decoded_length(payload: str, cte: str) -> int:
    n = len(payload)
    if cte == "base64":
        data = n - sum(payload.count(ch) for ch in "\r\n\t ")
        return max(0, data * 3 // 4 - payload[-8:].rstrip()[-2:].count("="))
    if cte == "quoted-printable":
        return max(0, n - 2 * payload.count("="))  # "=XX" → 1 byte, "=\n" → 0
    if cte in ("x-uuencode", "uuencode", "x-uue"):
        return n * 3 // 4
    return n


def _message_size(msg: Message) -> int:
    """Approximate serialized size of an enclosed message (headers + body)."""
    size = sum(len(k) + len(v) + 3 for k, v in msg.raw_items() if isinstance(v, str)) + 2
    payload = msg._payload
    if isinstance(payload, list):
        return size + sum(_message_size(p) + 40 for p in payload if isinstance(p, Message))
    return size + (len(payload) if isinstance(payload, str) else 0)


# --------------------------------------------------------------------------- charsets


@lru_cache(maxsize=256)
def _codec(charset: str | None) -> str | None:
    """Python codec for a MIME charset label, or None when unknown."""
    if not charset:
        return None
    match = _CHARSET_TOKEN.search(charset.strip().strip("\"'").lower())
    if not match:
        return None
    label = _LABEL_ALIASES.get(match.group(0), match.group(0))
    try:
        name = codecs.lookup(label).name
        b"".decode(name)  # rejects bytes-to-bytes codecs such as "base64"
    except Exception:
        return None
    return _CODEC_SUPERSETS.get(name, name)


def _decode_bytes(data: bytes, charset: str | None, defects: _Defects) -> str:
    """Decode text whose declared charset may be missing, unknown or wrong.

    Strict attempts first: the declared charset, then UTF-8 (UTF-8 first for
    Western single-byte labels). Then the declared charset with replacement
    characters if only a few bytes are bad (a glitch in otherwise right
    text), then Windows-1252, and Latin-1, which cannot fail.
    """
    codec = _codec(charset)
    if charset and codec is None:
        defects.add("charset:" + _charset_label(charset))
    if codec is None:
        strict: tuple[str, ...] = ("utf-8",)
    elif codec in _WESTERN_CODECS:
        strict = ("utf-8", codec)
    else:
        strict = (codec, "utf-8")
    for candidate in strict:
        try:
            text = data.decode(candidate)
        except Exception:
            continue
        if codec and candidate != codec and not data.isascii():
            defects.add("charset:mismatch")
        return text
    if codec:
        defects.add("charset:mismatch")
        text = _decode_mostly(data, codec)
        if text is not None:
            return text
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_mostly(data: bytes, codec: str) -> str | None:
    """Decode with replacement characters unless more than ~1% of it is bad."""
    try:
        text = data.decode(codec, "replace")
    except Exception:
        return None
    return text if text.count("\ufffd") <= max(1, len(text) // 100) else None


def _charset_label(charset: str) -> str:
    match = _CHARSET_TOKEN.search(charset.lower())
    return match.group(0)[:40] if match else "invalid"
