"""Participants: the address headers of a message as (role, address, name) entries. Pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.utils import getaddresses
from functools import lru_cache
from typing import Any

from .defects import Defects
from .headers import Headers, header_text, unfold

ADDRESS_ROLES = {
    "from": "from",
    "sender": "sender",
    "reply-to": "reply_to",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
}
# Caps (see connectors/mail.py): a record must fit in a MongoDB document whatever the headers say.
MAX_PARTICIPANTS = 1000
MAX_NAME_CHARS = 256
MAX_ADDRESS_CHARS = 254  # the longest forward-path SMTP allows (RFC 5321 4.5.3.1.3), brackets excluded
_MAX_ENTRIES_READ = 10 * MAX_PARTICIPANTS
# The stdlib address parser is slow pure Python: a longer entry is no real mailbox, read it cheaply.
_MAX_ENTRY_CHARS = 4096

_NOT_IN_ADDRESS = re.compile(r"[\s<>()\[\],;:\"]")
# Runs of characters an unquoted addr-spec may hold; the ones with an inner "@" are addresses.
# (Searching for "run@run" directly backtracks quadratically on a long run without "@".)
_ADDRESS_RUN = re.compile(r"[^\s<>()\[\],;:\"']+")


def participants(
    headers: Headers,
    hint: str | None,
    own: frozenset[str],
    domains: frozenset[str],
    defects: Defects,
) -> tuple[list[dict[str, Any]], bool]:
    """Address-header entries in header order, deduplicated by (role, address); and whether any was cut.

    At most MAX_PARTICIPANTS entries, names of at most MAX_NAME_CHARS;
    addresses longer than an SMTP path can be (MAX_ADDRESS_CHARS) are dropped.
    Reading stops after 10 * MAX_PARTICIPANTS entries (duplicates included).
    """
    result: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    cut = False
    read = 0
    for name, role in _address_headers_in_order(headers):
        for value in headers[name]:
            for display, addr in _parse_addresses(unfold(value, hint), defects):
                read += 1
                if read > _MAX_ENTRIES_READ:
                    return result, True
                address = _clean_address(addr)
                if address is None or (role, address) in seen:
                    continue
                if len(address) > MAX_ADDRESS_CHARS:
                    cut = True
                    continue
                if len(result) >= MAX_PARTICIPANTS:
                    return result, True
                seen.add((role, address))
                text, name_cut = _name(display, defects)
                cut = cut or name_cut
                result.append(
                    {
                        "role": role,
                        "address": address,
                        "name": text,
                        "internal": _is_internal(address, own, domains),
                    }
                )
    return result, cut


def _name(display: str, defects: Defects) -> tuple[str | None, bool]:
    """The decoded display name, at most MAX_NAME_CHARS; and whether it was cut."""
    if not display:
        return None, False
    # Decoding never makes text longer than its source (encoded words shrink), so
    # a generous cut of the source first keeps a megabyte "name" cheap.
    limit = 8 * MAX_NAME_CHARS
    text = header_text(display[:limit], defects)
    if text is not None and len(text) > MAX_NAME_CHARS:
        return text[:MAX_NAME_CHARS], True
    return text, len(display) > limit


def _address_headers_in_order(headers: Headers) -> list[tuple[str, str]]:
    # dicts keep insertion order, i.e. the order the headers first appeared.
    return [(name, ADDRESS_ROLES[name]) for name in headers if name in ADDRESS_ROLES]


def _parse_addresses(value: str, defects: Defects) -> Iterator[tuple[str, str]]:
    """(display name, addr-spec) pairs of one address header value, entry by entry.

    The value is split into entries here, not by the stdlib parser, so that a
    broken entry costs only itself and the stdlib's (version-dependent) way of
    reading it can be checked against what the entry plainly says.
    """
    for entry, angles in _entries(value):
        yield from _entry_pairs(entry, angles, defects)


# Quoted strings, comments and angle addresses are opaque; the separators count at the top level only.
# An unclosed quote or comment is a lone character, so it cannot swallow the rest of the list; an
# unclosed angle bracket runs to the next separator (a header cut short or glued to the next one).
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\((?:[^()\\]|\\.)*\)|<[^<>]*>|<[^<>,;]*|[,;:]|[^",;:()<>]+|.', re.S)


def _entries(value: str) -> Iterator[tuple[str, list[tuple[int, int]]]]:
    """Each mailbox entry of an address list, with the spans of its top-level <...>.

    A group's name ("Team:" of "Team: a@x, b@y;", "undisclosed-recipients:;")
    is dropped: it is not an address. A colon after an address is just text.
    """
    pieces: list[str] = []
    angles: list[tuple[int, int]] = []
    length = 0
    has_at = False
    for match in _TOKEN.finditer(value):
        token = match.group()
        if token == ":" and not has_at:
            pieces, angles, length = [], [], 0
            continue
        if token in (",", ";"):
            if "".join(pieces).strip():
                yield "".join(pieces), angles
            pieces, angles, length, has_at = [], [], 0, False
            continue
        if token[0] == "<":
            angles.append((length, length + len(token)))
        has_at = has_at or "@" in token
        pieces.append(token)
        length += len(token)
    if "".join(pieces).strip():
        yield "".join(pieces), angles


def _entry_pairs(entry: str, angles: list[tuple[int, int]], defects: Defects) -> list[tuple[str, str]]:
    if len(entry) > _MAX_ENTRY_CHARS:
        return _long_entry_pairs(entry, angles, defects)
    if len(angles) == 1:
        start, end = angles[0]
        # After the last colon: an obsolete source route (<@relay.example:user@host>) is not the address.
        inside = entry[start + 1 : end].removesuffix(">").rpartition(":")[2]
        address = _clean_address(inside)
        if address is not None and not _NOT_IN_ADDRESS.search(address):
            pairs = _getaddresses(entry)
            if len(pairs) == 1 and _clean_address(pairs[0][1]) == address:
                return pairs
            # Only the address in angle brackets is the address: an unquoted
            # display name that looks like one ("alice@example.com <bob@example.com>")
            # is a name, although the stdlib parser reads it as a second address.
            return [(_display_name(entry[:start]), inside)]
    pairs = _getaddresses(entry)
    if _plausible(pairs):
        return pairs
    # Python >= 3.11.10/3.12.6 parse strictly and give up on the whole entry;
    # the lenient parser still recovers a plausible address.
    lenient = _getaddresses(entry, strict=False)
    if _plausible(lenient):
        return lenient
    found = _bare_addresses(entry)
    if len(found) == 1 and not angles:
        # "Big Bug bb@bug.com": a name, then the address without its angle brackets.
        return [(_display_name(entry.replace(found[0], " ", 1)), found[0])]
    if found:
        # Space-separated lists and similar junk make the RFC parser glue or halve
        # addresses; scanning for addr-specs loses only the display names.
        defects.add("address:malformed")
    return [("", addr) for addr in found]


def _long_entry_pairs(entry: str, angles: list[tuple[int, int]], defects: Defects) -> list[tuple[str, str]]:
    """An entry too long to be a mailbox (a megabyte name or address): its angle address, else its addr-specs."""
    defects.add("address:too-long")
    if len(angles) == 1:
        start, end = angles[0]
        return [(_display_name(entry[:start]), entry[start + 1 : end].removesuffix(">"))]
    return [("", addr) for addr in _bare_addresses(entry)]


def _bare_addresses(text: str) -> list[str]:
    """Every addr-spec written without angle brackets (an "@" with something on both sides)."""
    return [run for run in _ADDRESS_RUN.findall(text) if "@" in run[1:-1]]


def _display_name(text: str) -> str:
    """The display name as written next to an address: unquoted, without stray brackets."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text.strip(' \t"<>:')


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
    """One entry's parse: exactly one usable address, not glued together from several words."""
    if len(pairs) != 1:
        return False
    addr = pairs[0][1]
    return _clean_address(addr) is not None and not any(ch.isspace() for ch in addr.strip())


def _clean_address(addr: str) -> str | None:
    address = "".join(addr.split()).strip("<>").lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return address


def _is_internal(address: str, own: frozenset[str], domains: frozenset[str]) -> bool:
    return address in own or address.rpartition("@")[2] in domains

