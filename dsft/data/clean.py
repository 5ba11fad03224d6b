"""Text cleanup of the `clean` step of `dsft data prepare`: HTML, Unicode, control characters,
Chinese punctuation style, Latin letters, digits and whitespace.

The operations run in a fixed order (the order of clean_text's docstring), whatever the order of
the keys in the config, so one config always gives one result.
"""

from __future__ import annotations

import html
import re
import unicodedata

from dsft.data.prepare_config import CleanStep

# --- HTML ---------------------------------------------------------------------------------------

_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_LINE_BREAK = re.compile(r"<br\s*/?\s*>|</p\s*>", re.IGNORECASE)
# A tag starts with a letter, "/" or "!" right after "<", so "a < b and c > d" is left alone.
_HTML_TAG = re.compile(r"</?[A-Za-z!][^<>]*>")

# --- Chinese punctuation ------------------------------------------------------------------------

FULLWIDTH_TO_HALFWIDTH = {
    "，": ",", "。": ".", "！": "!", "？": "?", "：": ":", "；": ";", "（": "(", "）": ")",
    "【": "[", "】": "]", "“": '"', "”": '"', "‘": "'", "’": "'", "、": ",",
}
"""to_halfwidth: each Chinese punctuation mark and the ASCII mark it becomes (、 becomes a comma)."""
HALFWIDTH_TO_FULLWIDTH = {",": "，", "!": "！", "?": "？", ":": "：", ";": "；", "(": "（", ")": "）"}
"""to_fullwidth: the ASCII marks that become Chinese ones, only right after a Han character (and "("
also right before one). Periods, quotes and brackets stay: "." is also a decimal point and quotes
have no direction in ASCII, so converting them would guess."""
_HALFWIDTH_TABLE = str.maketrans(FULLWIDTH_TO_HALFWIDTH)
# The full-width marks NFKC would turn into ASCII ones: kept unless to_halfwidth asks for that, so
# the punctuation style follows fullwidth_punctuation alone and "keep" really keeps "，".
_NFKC_PROTECTED = re.compile("([，！？：；（）])")

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_ASCII_MARK_AFTER_HAN = re.compile(rf"(?<=[{_HAN}])[,!?:;()]|\((?=[{_HAN}])")

# --- characters and whitespace ------------------------------------------------------------------

_KEPT_CONTROLS = ("\n", "\t")
_LATIN = re.compile(r"[A-Za-z]")
_DIGITS = re.compile(r"[0-9]")
_INLINE_SPACE = re.compile(r"[^\S\n]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str, step: CleanStep) -> str:
    """text with the operations of step applied, each only when on, in this order:

    strip_html, nfkc, control_chars, fullwidth_punctuation, remove_latin, remove_digits, whitespace.
    Whitespace comes last so the gaps left by removed tags, letters and digits are collapsed too.
    """
    if step.strip_html:
        text = strip_html(text)
    if step.nfkc:
        text = nfkc(text, keep_fullwidth_punctuation=step.fullwidth_punctuation != "to_halfwidth")
    if step.control_chars:
        text = remove_control_chars(text)
    if step.fullwidth_punctuation == "to_halfwidth":
        text = text.translate(_HALFWIDTH_TABLE)
    elif step.fullwidth_punctuation == "to_fullwidth":
        text = to_fullwidth(text)
    if step.remove_latin:
        text = _LATIN.sub("", text)
    if step.remove_digits:
        text = _DIGITS.sub("", text)
    if step.whitespace:
        text = normalize_whitespace(text)
    return text


def strip_html(text: str) -> str:
    """Remove comments and tags, turn <br> and </p> into newlines, then unescape entities (&amp; -> &).

    Entities are unescaped after the tags are gone, so an escaped "&lt;b&gt;" stays visible text.
    """
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_LINE_BREAK.sub("\n", text)
    return html.unescape(_HTML_TAG.sub("", text))


def nfkc(text: str, keep_fullwidth_punctuation: bool) -> str:
    """Unicode NFKC of text; with keep_fullwidth_punctuation, ，！？：；（） are left as they are."""
    if not keep_fullwidth_punctuation:
        return unicodedata.normalize("NFKC", text)
    # The split keeps the protected marks at odd positions; only the pieces between them are normalized.
    pieces = _NFKC_PROTECTED.split(text)
    return "".join(piece if i % 2 else unicodedata.normalize("NFKC", piece) for i, piece in enumerate(pieces))


def _control_class() -> str:
    """Every Cc/Cf character but newline and tab (the Basic Multilingual Plane, plus the tag characters)."""
    codes = [c for c in range(0x10000) if unicodedata.category(chr(c)) in ("Cc", "Cf") and chr(c) not in _KEPT_CONTROLS]
    return "[" + "".join(re.escape(chr(c)) for c in codes) + "\U000e0000-\U000e007f]"


# A regex, not a loop over characters: this runs on every text field of every record.
_CONTROL_PATTERN = re.compile(_control_class())


def remove_control_chars(text: str) -> str:
    """Remove characters of Unicode categories Cc and Cf (zero-width space, BOM, soft hyphen, ...)
    except newline and tab; a carriage return becomes a newline first, so no line is joined."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL_PATTERN.sub("", text)


def to_fullwidth(text: str) -> str:
    """Turn , ! ? : ; ( ) into ，！？：；（） right after a Han character, and "(" right before one."""
    return _ASCII_MARK_AFTER_HAN.sub(lambda match: HALFWIDTH_TO_FULLWIDTH[match.group()], text)


def normalize_whitespace(text: str) -> str:
    """Runs of spaces and tabs (any whitespace but newline) become one space, each line is trimmed,
    three or more newlines become two (one empty line at most), and the ends are stripped."""
    lines = [_INLINE_SPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()
