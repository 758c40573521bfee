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
_NOT_IN_ADDRESS = re.compile(r"[\s<>()\[\],;:\"]")
_BARE_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"']+@[^\s<>()\[\],;:\"']+")


def participants(
    headers: Headers,
    hint: str | None,
    own: frozenset[str],
    domains: frozenset[str],
    defects: Defects,
) -> list[dict[str, Any]]:
    """Address-header entries in header order, deduplicated by (role, address)."""
    result: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for name, role in _address_headers_in_order(headers):
        for value in headers[name]:
            for display, addr in _parse_addresses(unfold(value, hint), defects):
                address = _clean_address(addr)
                if address is None or (role, address) in seen:
                    continue
                seen.add((role, address))
                result.append(
                    {
                        "role": role,
                        "address": address,
                        "name": header_text(display, defects) if display else None,
                        "internal": _is_internal(address, own, domains),
                    }
                )
    return result


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
    for match in _TOKEN.finditer(value):
        token = match.group()
        if token == ":" and not any("@" in piece for piece in pieces):
            pieces, angles, length = [], [], 0
            continue
        if token in (",", ";"):
            if "".join(pieces).strip():
                yield "".join(pieces), angles
            pieces, angles, length = [], [], 0
            continue
        if token[0] == "<":
            angles.append((length, length + len(token)))
        pieces.append(token)
        length += len(token)
    if "".join(pieces).strip():
        yield "".join(pieces), angles


def _entry_pairs(entry: str, angles: list[tuple[int, int]], defects: Defects) -> list[tuple[str, str]]:
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
    found = _BARE_ADDRESS.findall(entry)
    if len(found) == 1 and not angles:
        # "Big Bug bb@bug.com": a name, then the address without its angle brackets.
        return [(_display_name(entry.replace(found[0], " ", 1)), found[0])]
    if found:
        # Space-separated lists and similar junk make the RFC parser glue or halve
        # addresses; scanning for addr-specs loses only the display names.
        defects.add("address:malformed")
    return [("", addr) for addr in found]


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

