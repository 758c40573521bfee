"""Participants: the address headers of a message as (role, address, name) entries. Pure functions."""

from __future__ import annotations

import re
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


def _parse_addresses(value: str, defects: Defects) -> list[tuple[str, str]]:
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

