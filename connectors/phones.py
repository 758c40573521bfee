"""Phone numbers: E.164 normalization and the textual forms a CRM may store. Pure functions.

Twilio reports numbers in E.164 (``+14155550100``), sometimes behind a channel
prefix (``whatsapp:+14155550100``). Customers' numbers are typed by people:
``(415) 555-0100``, ``+1 415-555-0100``, ``001 415 555 0100``. A number written
without a country code is read in ``default_region`` (an ISO 3166 code such as
``US``); with no region such a number cannot be read at all. CRMs fed by
vCard also hold RFC 3966 URIs: ``tel:+1-415-555-0100``.
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber, PhoneNumberFormat

# Channel prefixes Twilio and CRMs put in front of a number.
_SCHEME = re.compile(r"^\s*(whatsapp|tel|sms|mms|rcs|messenger|fax)\s*:\s*", re.IGNORECASE)
_E164 = re.compile(r"^\+[1-9]\d{5,14}$")
_GLOBAL_CONTEXT = re.compile(r";phone-context=\+", re.IGNORECASE)
# International call prefixes people write instead of "+": 00 (most of the world), 011 (NANP).
_IDD = ("00", "011")
# phonenumbers refuses longer input anyway; this caps work on garbage.
_MAX_CHARS = 64


def split_scheme(raw: str) -> tuple[str | None, str]:
    """``whatsapp:+1415...`` -> ``("whatsapp", "+1415...")``; no prefix -> ``(None, raw)``."""
    match = _SCHEME.match(raw)
    if not match:
        return None, raw.strip()
    return match.group(1).lower(), raw[match.end() :].strip()


def is_e164(value: object) -> bool:
    """True for a string that is already E.164 (``+`` and 6 to 15 digits)."""
    return isinstance(value, str) and bool(_E164.match(value))


def region_is_known(region: str) -> bool:
    """True when phonenumbers has metadata for ``region`` (``US``, ``DE``, ...)."""
    return region.upper() in phonenumbers.SUPPORTED_REGIONS


def to_e164(raw: object, region: str | None = None) -> str | None:
    """The E.164 form of ``raw``, or None when it is not a phone number.

    Reading order, so that a number means the same thing wherever it is read:
    an explicit ``+``; a valid number of ``region``; an international call
    prefix written instead of ``+`` (``001 415 ...``, ``011 44 ...``); a
    possible number of ``region``; and last, digits that only make sense with
    their country code in front (``442071234567``).
    """
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        return None
    _, text = split_scheme(raw)
    if not text or len(text) > _MAX_CHARS or not any(c.isdigit() for c in text):
        return None
    if text.startswith("+"):
        return _format_if(_parse(text, None), possible=True)
    if _GLOBAL_CONTEXT.search(text):
        # RFC 3966 local number whose context is a country code ("tel:212-555-0187;phone-context=+1"):
        # the context says what the default region would.
        return _format_if(_parse(text, None), possible=True)
    digits = re.sub(r"\D", "", text)
    local = _parse(text, region) if region else None
    if local is not None and phonenumbers.is_valid_number(local):
        return _e164(local)
    for idd in _IDD:
        if digits.startswith(idd) and len(digits) > len(idd) + 3:
            found = _format_if(_parse("+" + digits[len(idd) :], None), possible=True)
            if found:
                return found
    if local is not None and phonenumbers.is_possible_number(local):
        return _e164(local)
    return _format_if(_parse("+" + digits, None), possible=False)


def variants(e164: str, region: str | None = None) -> tuple[str, ...]:
    """Common ways people write ``e164``, each of which ``to_e164(v, region)`` reads back as ``e164``.

    Used to look customers up by exact string (index-friendly) although their
    numbers are stored in many formats. National forms appear only when the
    number belongs to ``region``'s country code, because only then does a
    reader of ``region`` understand them.
    """
    return _variants(e164, (region or "").upper() or None)


@lru_cache(maxsize=20_000)
def _variants(e164: str, region: str | None) -> tuple[str, ...]:
    number = _parse(e164, None)
    if number is None or not is_e164(e164):
        return ()
    cc = str(number.country_code)
    nsn = phonenumbers.national_significant_number(number)
    intl = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
    bodies = _bodies(re.findall(r"\d+", intl.removeprefix("+" + cc)) or [nsn])
    national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
    ngroups = re.findall(r"\d+", national) or [nsn]
    trunk = "".join(ngroups)[: -len(nsn)] if "".join(ngroups).endswith(nsn) else ""

    # Separators and brackets never change how a number reads, so one
    # separator-free representative decides for each family of prefixes
    # (parsing every candidate would cost milliseconds per number).
    def reads_back(representative: str) -> bool:
        return to_e164(representative, region) == e164

    out = {e164, f"whatsapp:{e164}", f"tel:{e164}"}
    out |= {p + b for p in (f"+{cc} ", f"+{cc}-", f"+{cc}.", f"+{cc}") for b in bodies}
    if trunk and reads_back(f"+{cc}({trunk}){nsn}"):
        # "+44 (0)20 7123 4567": the trunk prefix in brackets, common in Europe.
        out |= {f"+{cc} ({trunk}){b}" for b in bodies} | {f"+{cc} ({trunk}) {b}" for b in bodies}
    families = [(cc, (f"{cc} ", f"{cc}-", f"{cc}.", cc))] + [(idd + cc, (f"{idd}{cc} ", f"{idd} {cc} ", f"{idd}{cc}")) for idd in _IDD]
    for representative, prefixes in families:
        if reads_back(representative + nsn):
            out |= {p + b for p in prefixes for b in bodies}
    local = region and region_is_known(region) and phonenumbers.country_code_for_region(region) == number.country_code
    if local and reads_back("".join(ngroups)):
        out |= _bodies(ngroups) | {national}
    # RFC 3966 URIs (vCard 4, CRM imports): "tel:+1-212-555-0187", a global number with visual separators and no spaces.
    out |= {f"tel:{v}" for v in out if v.startswith("+") and " " not in v}
    return tuple(sorted(out))


def _bodies(groups: list[str]) -> set[str]:
    """The digit groups joined the ways people join them: 415 555 0100, 415-555-0100, (415) 555-0100 ..."""
    out = {sep.join(groups) for sep in ("", " ", "-", ".")}
    if len(groups) >= 2:
        head, rest = groups[0], groups[1:]
        out |= {f"({head}) " + "-".join(rest), f"({head}) " + " ".join(rest), f"({head})" + "-".join(rest)}
    return out


def _parse(text: str, region: str | None) -> PhoneNumber | None:
    try:
        return phonenumbers.parse(text, region)
    except NumberParseException:
        return None


def _e164(number: PhoneNumber) -> str:
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def _format_if(number: PhoneNumber | None, *, possible: bool) -> str | None:
    """E.164 when ``number`` is possible (lenient) or valid (strict), else None."""
    if number is None:
        return None
    ok = phonenumbers.is_possible_number(number) if possible else phonenumbers.is_valid_number(number)
    return _e164(number) if ok else None
