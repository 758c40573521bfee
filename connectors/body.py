"""The body of a message: which part is the content, its text (HTML converted), and the attachments. Pure.

Attachment payloads are never decoded; their size is estimated from the
encoded length.
"""

from __future__ import annotations

import html as html_lib
import re
from email.message import Message
from typing import Any

from .charsets import codec, decode_bytes
from .defects import Defects
from .headers import collapse, decode_8bit_header, header_text, unfold

_HASH_CONTENT_CHARS = 4096
# Caps (see connectors/mail.py): a record must fit in a MongoDB document whatever the MIME structure.
MAX_ATTACHMENTS = 500
MAX_ATTACHMENT_TEXT_CHARS = 255  # a filename (most file systems' limit) or a content type (RFC 6838: 127 + "/" + 127)

_LINEBREAK = re.compile(r"\r\n?|\n")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){3,}")
_META_CHARSET = re.compile(rb"<meta[^>]{0,200}?charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:+-]+)", re.I)
_HTML_DROP = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.I | re.S)
_HTML_BREAK = re.compile(r"<(?:br|/p|/div|/tr|/li|/h[1-6])\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]*>")


class Body:
    """Readable text and attachment metadata of a parsed message."""

    __slots__ = ("_hash_source", "attachments", "attachments_truncated", "charset_hint", "text", "truncated", "visited")

    def __init__(self, msg: Message | None, defects: Defects, max_chars: int) -> None:
        self.text = ""
        self._hash_source = ""
        self.truncated = False
        self.attachments: list[dict[str, Any]] = []
        self.attachments_truncated = False
        self.charset_hint: str | None = None
        self.visited: list[Message] = []
        if msg is not None:
            self._fill(msg, defects, max_chars)

    @property
    def hash_text(self) -> str:
        """The text a message without a Message-ID is identified by (computed only for such messages)."""
        return collapse(self._hash_source)[:_HASH_CONTENT_CHARS]

    @classmethod
    def empty(cls) -> Body:
        return cls(None, Defects(), 0)

    def _fill(self, msg: Message, defects: Defects, max_chars: int) -> None:
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
        self._hash_source = normalized[: _HASH_CONTENT_CHARS * 4]
        self.truncated = cut or len(normalized) > max_chars
        self.text = normalized[:max_chars]
        self.attachments, self.attachments_truncated = _attachments(leaves, chosen, defects)


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


def _filename(part: Message, hint: str | None, defects: Defects) -> str | None:
    """Attachment filename, RFC 2231 and RFC 2047 decoded."""
    try:
        name = _param_view(part, hint).get_filename()
    except Exception:
        defects.add("attachment:bad-filename")
        return None
    if not isinstance(name, str):
        return None
    return header_text(unfold(name, hint), defects)


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
        view[name] = decode_8bit_header(value, hint)
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
            name = codec(_declared_charset(leaf.part))
            if name:
                return name
    return None


def _choose_body(
    leaves: list[_Leaf], defects: Defects, max_chars: int
) -> tuple[_Leaf | None, str, bool]:
    """Pick the body: the first non-blank inline text/plain, else the first non-blank inline text/html.

    Returns (chosen leaf, text, whether the source was cut before converting).
    Blank parts come first in real mail (an empty plain part before the real
    one, a blank HTML copy), so they are passed over, not chosen.
    """
    inline = [leaf for leaf in leaves if leaf.disposition != "attachment"]
    plains = [leaf for leaf in inline if leaf.ctype == "text/plain"]
    for leaf in plains:
        text = _part_text(leaf, defects)
        if text and not text.isspace():
            return leaf, text, False
    blank_html: tuple[_Leaf, str, bool] | None = None
    for leaf in inline:
        if leaf.ctype != "text/html":
            continue
        text, cut = _html_to_text(_part_text(leaf, defects), max_chars, defects)
        if text and not text.isspace():
            return leaf, text, cut
        blank_html = blank_html or (leaf, text, cut)
    if blank_html is not None:
        return blank_html
    return (plains[0] if plains else None), "", False


def _part_text(leaf: _Leaf, defects: Defects) -> str:
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
        # Only a candidate for the body gets here, so detecting an undeclared charset is worth it.
        return decode_bytes(data, charset, defects, detect=True)
    except Exception:
        defects.add("content:decode-failed")
        return ""


def _sniff_html_charset(data: bytes) -> str | None:
    match = _META_CHARSET.search(data, 0, 2048)
    return match.group(1).decode("ascii") if match else None


def _html_to_text(html: str, max_chars: int, defects: Defects) -> tuple[str, bool]:
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


def _attachments(leaves: list[_Leaf], chosen: _Leaf | None, defects: Defects) -> tuple[list[dict], bool]:
    """Metadata of parts a mail client would show as attachments; and whether any was cut.

    At most MAX_ATTACHMENTS entries, filenames and content types of at most
    MAX_ATTACHMENT_TEXT_CHARS.
    """
    result = []
    cut = False
    for leaf in leaves:
        if leaf is chosen:
            continue
        if leaf.disposition == "attachment" or leaf.filename or not leaf.ctype.startswith("text/"):
            if len(result) >= MAX_ATTACHMENTS:
                return result, True
            filename, ctype = leaf.filename, leaf.ctype
            if filename is not None and len(filename) > MAX_ATTACHMENT_TEXT_CHARS:
                filename, cut = filename[:MAX_ATTACHMENT_TEXT_CHARS], True
            if len(ctype) > MAX_ATTACHMENT_TEXT_CHARS:
                ctype, cut = ctype[:MAX_ATTACHMENT_TEXT_CHARS], True
            result.append(
                {
                    "filename": filename,
                    "content_type": ctype,
                    "size": _estimated_size(leaf.part, defects),
                }
            )
    return result, cut


def _estimated_size(part: Message, defects: Defects) -> int:
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
