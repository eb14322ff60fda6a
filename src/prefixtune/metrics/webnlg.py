"""Text normalization of the WebNLG 2017 challenge evaluation (webnlg-automatic-evaluation).

Before BLEU (multi-bleu.perl -lc), METEOR and TER the official script lower-cases,
transliterates to ASCII (unidecode) and splits every non-word character off as its own
token (`re.split` on non-word characters, whitespace collapsed). It does this in a
slightly different order for system outputs and for references; we keep both orders.
"""

import re
import unicodedata
import warnings

try:  # the official script uses unidecode; fall back to a close approximation without it
    from unidecode import unidecode as _unidecode
except ImportError:  # pragma: no cover - depends on the environment
    _unidecode = None

# Characters in WebNLG texts that do not decompose to ASCII under NFKD.
_EXTRA_ASCII = str.maketrans({
    "\u2013": "-", "\u2014": "--", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u0131": "i", "\u00f8": "o", "\u00d8": "O", "\u00e6": "ae", "\u00c6": "AE", "\u0153": "oe",
    "\u0152": "OE", "\u00df": "ss", "\u0142": "l", "\u0141": "L", "\u0111": "d", "\u0110": "D",
    "\u00f0": "d", "\u00fe": "th",
})


def to_ascii(text: str) -> str:
    """unidecode when installed, else NFKD without combining marks plus a small table
    (identical for accented Latin letters and common punctuation, not for other scripts)."""
    if _unidecode is not None:
        return _unidecode(text)
    if not text.isascii():
        warnings.warn(
            "unidecode is not installed: non-ASCII text is transliterated approximately, so "
            "WebNLG/DART scores may differ from the official script (pip install Unidecode==1.4.0)",
            RuntimeWarning,
            stacklevel=2,
        )
    decomposed = unicodedata.normalize("NFKD", text.translate(_EXTRA_ASCII))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _split_non_word(text: str) -> str:
    return " ".join(" ".join(re.split(r"(\W)", text)).split())


def normalize_hypothesis(text: str) -> str:
    """As the script treats a system output: lower-case, ASCII, then split."""
    return _split_non_word(to_ascii(text.lower()))


def normalize_reference(text: str) -> str:
    """As the script treats a reference: split, then lower-case and ASCII."""
    return to_ascii(_split_non_word(text).lower())
