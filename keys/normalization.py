"""Unicode folding of prompt text, so look-alike and invisible characters do not
slip past a prompt rule."""

import functools
import re
import sys
import unicodedata
from collections.abc import Iterable

from confusable_homoglyphs.utils import load as load_confusables_data

# Default-ignorable code points outside category Cf, which is dropped whole:
# Unicode's Other_Default_Ignorable_Code_Point and Variation_Selector ranges
# (combining grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian
# and other variation selectors, reserved and tag ranges).
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x2065, 0x2065),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0xE0000, 0xE0FFF),
)

# Format characters (zero-width space and joiners, soft hyphen, bidi controls,
# tags), nonspacing marks and enclosing marks.
_DROPPED_CATEGORIES = frozenset({"Cf", "Mn", "Me"})

_WHITESPACE_RUN = re.compile(r"\s+")

# Control characters other than whitespace, private-use, surrogate and
# unassigned code points, which show nothing and are dropped.
_UNPRINTED_CATEGORIES = frozenset({"Cc", "Co", "Cs", "Cn"})
# Symbols that render blank or as a box: the braille blank, the object
# replacement character and the replacement character.
_BLANK_SYMBOLS = frozenset({0x2800, 0xFFFC, 0xFFFD})
_SMALL_CAPITAL = re.compile(r"^LATIN LETTER SMALL CAPITAL (?P<letter>[A-Z])$")


def normalize(text: str) -> str:
    """Fold `text` into the form that rules are matched in and validated against.

    The steps, in order:

    - NFKC, which folds fullwidth forms, mathematical alphanumerics, ligatures,
      circled and superscript letters and compatibility spaces, then NFD.
    - Casefold.
    - Drop every format character (category Cf: zero-width space, joiners, soft
      hyphen, bidi controls, tags), every other default-ignorable code point
      (variation selectors, Hangul fillers) and every combining mark (categories
      Mn and Me), so accents are folded: "Café" becomes "cafe".
    - Map each non-ASCII character that Unicode's confusables data (UTS #39, as
      shipped by confusable-homoglyphs) lists as a look-alike of an ASCII
      character to that character, in lower case: Cyrillic "а" and Greek "ο"
      become "a" and "o".
    - Recompose with NFC and collapse each run of whitespace to one space.
      Leading and trailing whitespace is kept.

    It does not fold ASCII look-alikes into each other ("0" stays "0", "1" stays
    "1", "rn" stays "rn"), so leetspeak such as "s3cr3t" is not caught. It does
    not transliterate: letters that look like no ASCII character stay as they
    are. Dropping marks also merges words in scripts that write vowels or voicing
    with them (Hebrew points, Devanagari vowel signs, Japanese dakuten), so
    keywords in those scripts match a little more broadly.

    Casefolding first keeps the result the same for upper and lower case in
    every script, but it loses upper-case look-alikes whose lower case looks
    different (Greek "Ν" looks like "N", "ν" like "v"). check_rules() therefore
    also matches in a skeleton that maps before it casefolds.
    """
    decomposed = _decompose(text)
    folded = decomposed.casefold().translate(_translation_table())
    return _recompose(folded)


def match_forms(text: str) -> tuple[str, str]:
    """Compute normalize(text) and the skeleton of `text`, which maps look-alikes
    as written and only then casefolds.

    The skeleton is UTS #39's skeleton followed by a casefold: Greek "ΝΕΤ" is
    "net" there but "vet" in normalize(). The two differ only for letters whose
    upper and lower case have different look-alikes.
    """
    decomposed = _decompose(text)
    table = _translation_table()
    normalized = _recompose(decomposed.casefold().translate(table))
    skeleton = _recompose(decomposed.translate(table).casefold())
    return normalized, skeleton


def _decompose(text: str) -> str:
    visible = _drop_unprinted(text)
    return unicodedata.normalize("NFD", unicodedata.normalize("NFKC", visible))


def _recompose(text: str) -> str:
    return _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))


@functools.cache
def _translation_table() -> dict[int, str | None]:
    """Build the str.translate table that drops ignorable characters and maps
    look-alikes to lower-case ASCII. Built once per process, on first use."""
    skeletons = _ascii_skeletons()
    table: dict[int, str | None] = {}
    for code_point in range(0x80, sys.maxunicode + 1):
        char = chr(code_point)
        if unicodedata.category(char) in _DROPPED_CATEGORIES:
            table[code_point] = None
        elif char in skeletons:
            table[code_point] = skeletons[char]
    for first, last in _IGNORABLE_RANGES:
        for code_point in range(first, last + 1):
            table[code_point] = None
    # Small capitals ("ʙᴏᴍʙ") are not in the confusables data, so their
    # Unicode names give the Latin letter.
    for code_point in range(0x80, sys.maxunicode + 1):
        match = _SMALL_CAPITAL.match(unicodedata.name(chr(code_point), ""))
        if match and code_point not in table:
            table[code_point] = match["letter"].lower()
    return table


def _drop_unprinted(text: str) -> str:
    """Remove characters that show nothing and carry no letter.

    They are control characters other than whitespace, private-use,
    unassigned and surrogate code points, and a few blank symbols. Only the
    distinct characters of the text are examined, because the ~800,000 such
    code points would make the translation table large.
    """
    dropped = {
        ord(char): None
        for char in set(text)
        if ord(char) in _BLANK_SYMBOLS
        or not char.isprintable()
        and not char.isspace()
        and unicodedata.category(char) in _UNPRINTED_CATEGORIES
    }
    return text.translate(dropped) if dropped else text


def _ascii_skeletons() -> dict[str, str]:
    """Map each non-ASCII character with an ASCII look-alike to that look-alike,
    in lower case.

    confusable-homoglyphs stores each confusable pair in both directions, so the
    ASCII look-alikes of a character are found among its own entries.
    """
    # Importing the data module would keep the data for the life of the
    # process. Read here, it is freed once the translation table is built.
    confusables_data = load_confusables_data("confusables.json")
    skeletons = {}
    for char, homoglyphs in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        candidates = {
            entry["c"] for entry in homoglyphs if _is_ascii_target(entry["c"])
        }
        # UTS #39 maps every "I"-like character to its prototype "l", and
        # "0"-like ones to "O". Adding the prototype's own ASCII look-alikes
        # lets Cyrillic "І" map to "I", which casefolds to "i" as in "PIN".
        for candidate in list(candidates):
            for entry in confusables_data.get(candidate, ()):
                if _is_ascii_target(entry["c"]):
                    candidates.add(entry["c"])
        if candidates:
            skeletons[char] = _preferred_ascii_target(char, candidates).lower()
    return skeletons


def _is_ascii_target(candidate: str) -> bool:
    return candidate.isascii() and candidate.isprintable() and " " not in candidate


def _preferred_ascii_target(char: str, candidates: Iterable[str]) -> str:
    """Pick the ASCII look-alike of `char` to map it to.

    A single letter of the same case as `char` comes first, then a letter of the
    other case, a digit, other printable ASCII, and last a sequence such as "rn".
    """

    def rank(candidate: str) -> tuple[int, str]:
        if len(candidate) > 1:
            order = 4
        elif candidate.isalpha():
            order = 0 if candidate.isupper() == char.isupper() else 1
        else:
            order = 2 if candidate.isdigit() else 3
        return (order, candidate)

    return min(candidates, key=rank)
