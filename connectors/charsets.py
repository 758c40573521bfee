"""Charsets: MIME charset labels to Python codecs, and decoding bytes whose label may lie. Pure functions."""

from __future__ import annotations

import codecs
import re
from functools import lru_cache

from .defects import Defects

_CHARSET_TOKEN = re.compile(r"[A-Za-z0-9_.:+-]+")

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


@lru_cache(maxsize=256)
def codec(charset: str | None) -> str | None:
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


def decode_bytes(data: bytes, charset: str | None, defects: Defects) -> str:
    """Decode text whose declared charset may be missing, unknown or wrong.

    Strict attempts first: the declared charset, then UTF-8 (UTF-8 first for
    Western single-byte labels). Then the declared charset with replacement
    characters if only a few bytes are bad (a glitch in otherwise right
    text), then Windows-1252, and Latin-1, which cannot fail.
    """
    name = codec(charset)
    if charset and name is None:
        defects.add("charset:" + _charset_label(charset))
    if name is None:
        strict: tuple[str, ...] = ("utf-8",)
    elif name in _WESTERN_CODECS:
        strict = ("utf-8", name)
    else:
        strict = (name, "utf-8")
    for candidate in strict:
        try:
            text = data.decode(candidate)
        except Exception:
            continue
        if name and candidate != name and not data.isascii():
            defects.add("charset:mismatch")
        return text
    if name:
        defects.add("charset:mismatch")
        text = _decode_mostly(data, name)
        if text is not None:
            return text
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_utf8_mostly(data: bytes) -> str | None:
    """UTF-8 with a few broken sequences (a cut multi-byte character): the valid text, U+FFFD for the broken bytes.

    None unless the valid multi-byte characters outnumber the broken bytes
    four to one: legacy 8-bit text (Latin-1, KOI8-R, Big5 ...) has few or no
    valid UTF-8 sequences, so it is left to the legacy decoders.
    """
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    if not bad:
        return text
    good = sum(1 for ch in text if ch > "\x7f") - bad
    return text if good >= 4 * bad else None


def _decode_mostly(data: bytes, name: str) -> str | None:
    """Decode with replacement characters unless more than ~1% of it is bad."""
    try:
        text = data.decode(name, "replace")
    except Exception:
        return None
    return text if text.count("\ufffd") <= max(1, len(text) // 100) else None


def _charset_label(charset: str) -> str:
    match = _CHARSET_TOKEN.search(charset.lower())
    return match.group(0)[:40] if match else "invalid"
