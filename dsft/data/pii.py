"""Find personal data in text and mask it or replace it by a salted hash (the `pii` step).

Kinds: email, phone, cn_id (Chinese resident ID), bank_card and ip. The detectors run on the
original text in a fixed priority order, email, cn_id, bank_card, phone, ip; a match overlapping
one of a kind found earlier is dropped, so a bank card is never also counted as a phone and a
digit run inside an email address is not a phone. Every number detector refuses to start or end
inside a longer run of digits, so order numbers and the like are not cut into "phones".
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import date

from dsft.data.fields import map_texts
from dsft.data.prepare_config import PiiStep

KIND_ORDER = ("email", "cn_id", "bank_card", "phone", "ip")
"""Priority of the detectors: where two matches overlap, the kind earlier here wins."""
HASH_HEX_CHARS = 12
"""Hex characters of the salted sha256 kept in a hashed replacement ([PHONE:0123456789ab])."""
ID_FIELD_COUNT_KEY = "user_id"
"""The counts key of replaced id_fields values."""

_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}")
_CN_ID = re.compile(r"(?<!\d)\d{17}[\dXx](?![\dXx])")
# 13 to 19 digits with at most one space or dash between two digits (4111 1111 1111 1111).
_BANK_CARD = re.compile(r"(?<![\d+])\d(?:[ -]?\d){12,18}(?!\d)")
_CN_MOBILE = r"(?:(?:\+|00)?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"
# International: "+", then 8 to 15 digits in all (E.164), spaces or dashes between them.
_INTERNATIONAL = r"\+[1-9](?:[ -]?\d){7,14}"
_PHONE = re.compile(rf"(?<![\d+])(?:{_CN_MOBILE}|{_INTERNATIONAL})(?!\d)")
_CN_MOBILE_DIGITS = re.compile(r"(?:86)?1[3-9]\d{9}")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not preceded by a digit or dot, nor followed by a digit or ".digit": 1.2.3.4.5 is a version, not an IP.
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\d|\.\d)")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:.])")
_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_ID_CHECK_CHARS = "10X98765432"
_SEPARATORS = re.compile(r"[ -]")


def mask_pii(text: str, step: PiiStep, counts: Counter) -> str:
    """text with every match of the kinds in step.kinds replaced by "[KIND]" (action mask) or
    "[KIND:<12 hex of sha256(salt + value)>]" (action hash); counts[kind] grows by one per match.

    For the hash, value is the match with spaces and dashes removed (and an email lower-cased,
    an ID's x upper-cased), so one number written two ways hashes the same.
    """
    spans = _find(text, step.kinds)
    for start, end, kind in reversed(spans):
        counts[kind] += 1
        text = text[:start] + _replacement(kind, text[start:end], step) + text[end:]
    return text


def hash_id(value: str, salt: str) -> str:
    """The full sha256 hex digest of salt + value (for id_fields)."""
    return hashlib.sha256((salt + value).encode("utf-8")).hexdigest()


def mask_record(record: dict, fmt: str, step: PiiStep, counts: Counter) -> dict:
    """A copy of record with mask_pii on every text field of format fmt and each top-level
    step.id_fields value that is a str or int replaced by hash_id(str(value), step.salt)
    (counts["user_id"] grows by one each); an absent or other-typed id field is left as it is."""
    out = map_texts(record, fmt, lambda text: mask_pii(text, step, counts))
    for name in step.id_fields:
        value = out.get(name)
        # bool is an int subclass, but True is no user id.
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            out[name] = hash_id(str(value), step.salt)
            counts[ID_FIELD_COUNT_KEY] += 1
    return out


def _find(text: str, kinds: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, kind) of the accepted matches, sorted by start, none overlapping."""
    accepted: list[tuple[int, int, str]] = []
    for kind in KIND_ORDER:
        if kind not in kinds:
            continue
        for start, end in _DETECTORS[kind](text):
            if all(end <= other_start or start >= other_end for other_start, other_end, _ in accepted):
                accepted.append((start, end, kind))
    return sorted(accepted)


def _replacement(kind: str, value: str, step: PiiStep) -> str:
    if step.action == "mask":
        return f"[{kind.upper()}]"
    digest = hash_id(_normalized(kind, value), step.salt)[:HASH_HEX_CHARS]
    return f"[{kind.upper()}:{digest}]"


def _normalized(kind: str, value: str) -> str:
    if kind == "email":
        return value.lower()
    if kind == "ip":
        return value
    return _SEPARATORS.sub("", value).upper()


# --- detectors: each yields the (start, end) of its valid matches -------------------------------


def _emails(text: str) -> Iterator[tuple[int, int]]:
    return (match.span() for match in _EMAIL.finditer(text))


def _cn_ids(text: str) -> Iterator[tuple[int, int]]:
    return (match.span() for match in _CN_ID.finditer(text) if is_valid_cn_id(match.group()))


def _bank_cards(text: str) -> Iterator[tuple[int, int]]:
    for match in _BANK_CARD.finditer(text):
        digits = _SEPARATORS.sub("", match.group())
        # A mobile number written with its 86 prefix can be Luhn-valid by chance (1 in 10): it is a phone.
        if luhn_valid(digits) and not _CN_MOBILE_DIGITS.fullmatch(digits):
            yield match.span()


def _phones(text: str) -> Iterator[tuple[int, int]]:
    return (match.span() for match in _PHONE.finditer(text))


def _ips(text: str) -> Iterator[tuple[int, int]]:
    yield from (match.span() for match in _IPV4.finditer(text))
    for match in _IPV6_CANDIDATE.finditer(text):
        # The pattern is loose (any hex and colons); the ipaddress module decides. "::" alone is no address.
        if any(c in "0123456789abcdefABCDEF" for c in match.group()) and _is_ipv6(match.group()):
            yield match.span()


def _is_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


_DETECTORS: dict[str, Callable[[str], Iterator[tuple[int, int]]]] = {
    "email": _emails, "cn_id": _cn_ids, "bank_card": _bank_cards, "phone": _phones, "ip": _ips,
}


# --- check digits -------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """Whether the digit string passes the Luhn check of payment card numbers."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char) * (2 if i % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def is_valid_cn_id(number: str) -> bool:
    """Whether an 18-character Chinese resident ID has a real birth date (YYYYMMDD at 6..14, year
    from 1900) and the right ISO 7064 MOD 11-2 check character (0-9 or X) at the end.

    The old 15-digit form has no check digit, so it cannot be told from other numbers: not detected.
    """
    if len(number) != 18 or not number[:17].isdigit():
        return False
    try:
        birth = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    if birth.year < 1900:
        return False
    total = sum(int(digit) * weight for digit, weight in zip(number[:17], _CN_ID_WEIGHTS))
    return _CN_ID_CHECK_CHARS[total % 11] == number[17].upper()
