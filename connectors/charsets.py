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

# What undeclared 8-bit mail is written in: the Windows code pages and the
# national standards mail clients used before UTF-8. Limiting the detector to
# these keeps it from answering with a code page no mail client ever wrote
# (short Spanish text "is" Urdu cp1006 otherwise).
_DETECTABLE = (
    "cp1252", "iso8859_15", "cp1250", "iso8859_2", "cp1251", "koi8_r", "koi8_u", "iso8859_5",
    "cp1253", "iso8859_7", "cp1254", "cp1255", "cp1256", "cp1257", "cp874", "cp1258",
    "big5", "gb18030", "cp932", "euc_jp", "cp949",
)  # fmt: skip
# Enough text to recognise a charset; detecting on megabytes would cost a decode of each per candidate.
_DETECT_SAMPLE_BYTES = 32 * 1024
_DETECT_MIN_8BIT = 8
_ASCII_BYTES = bytes(range(0x80))
_DETECT_MESS_SLACK = 0.05


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


def decode_bytes(data: bytes, charset: str | None, defects: Defects, *, detect: bool = False) -> str:
    """Decode text whose declared charset may be missing, unknown or wrong.

    Strict attempts first: the declared charset, then UTF-8 (UTF-8 first for
    Western single-byte labels). Then the declared charset with replacement
    characters if only a few bytes are bad (a glitch in otherwise right
    text). With no charset declared: UTF-8 with a few broken sequences, then,
    if ``detect`` (the caller will use this text), the charset
    charset-normalizer finds. Then Windows-1252, and Latin-1, which cannot fail.
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
    elif not charset:
        text = decode_utf8_mostly(data)
        if text is None and detect:
            detected = _detect(data)
            if detected is not None:
                text = _decode_mostly(data, detected)
        if text is not None:
            return text
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _detect(data: bytes) -> str | None:
    """The legacy charset of undeclared 8-bit text, from a bounded sample; None when unsure.

    charset-normalizer ranks by how messy each decoding looks; on a few lines
    of mail that often ties or is off by a hair (Shift_JIS text reads as
    Korean cp949 with no mess at all), so among the nearly-as-clean answers the
    one in a recognisable language wins, and among equally good answers the
    mail default, Windows-1252. A handful of 8-bit bytes says nothing: None.
    """
    sample = data[:_DETECT_SAMPLE_BYTES]
    if len(data) > len(sample):
        # End the sample at a line break: never inside a multi-byte character.
        cut = sample.rfind(b"\n")
        sample = sample[:cut] if cut > 0 else sample
    if len(sample.translate(None, _ASCII_BYTES)) < _DETECT_MIN_8BIT:
        return None
    try:
        from charset_normalizer import from_bytes  # deferred: only undeclared 8-bit bodies need it

        matches = list(from_bytes(sample, cp_isolation=list(_DETECTABLE)))
    except Exception:
        return None
    if not matches:
        return None
    least_mess = min(match.chaos for match in matches)
    clean = [match for match in matches if match.chaos <= least_mess + _DETECT_MESS_SLACK]
    most_coherent = max(match.coherence for match in clean)
    best = [match for match in clean if match.coherence == most_coherent]
    if any("cp1252" in match.could_be_from_charset for match in best):
        return "cp1252"
    return codec(best[0].encoding)


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
    good = len(text) - len(text.encode("ascii", "ignore")) - bad
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
