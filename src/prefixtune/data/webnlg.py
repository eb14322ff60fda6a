"""WebNLG Challenge 2017 (Gardent et al., 2017): DBpedia triple sets -> text.

XML files (``train/`` and ``dev/`` folders with ``Ntriples`` subfolders, or single files)::

    <entry category="Airport" eid="Id1" size="2">
      <modifiedtripleset>
        <mtriple>Aarhus_Airport | cityServed | Aarhus</mtriple> ...
      </modifiedtripleset>
      <lex comment="good" lid="Id1">Aarhus airport serves the city of Aarhus.</lex> ...
    </entry>

Sources are the modified triples, linearized as Li & Liang's code does: every triple
is preceded by `` | `` (so the source starts with a space) and written
``subject : property : object``, entities exactly as in the XML (underscores kept)::

     | Aarhus_Airport : cityServed : Aarhus | Aarhus : leaderName : Jacob_Bundsgaard

Every ``<lex comment="good">`` (or ``<lex>`` without a comment) is a reference; ``toFix``
lexicalisations are left out unless ``include_tofix=True`` (the train split has 18,025
good texts and 77 toFix ones). Each source's metadata records its ``category``, whether
that category is ``seen`` (one of the 10 train/dev categories) and the triple-set
``size``. ``categories=`` / ``exclude_categories=`` keep or drop categories, e.g. to hold
some out of training and study extrapolation to unseen categories.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from .base import DataError, Dataset, Example, locate
from .fetch import Resource

NAME = "webnlg"
HOMEPAGE = "https://gitlab.com/shimorina/webnlg-dataset/-/tree/master/webnlg_challenge_2017"
LICENSE = "CC BY-NC-SA 4.0"

SEEN_CATEGORIES = frozenset(
    {"Airport", "Astronaut", "Building", "City", "ComicsCharacter",
     "Food", "Monument", "SportsTeam", "University", "WrittenWork"}
)
UNSEEN_CATEGORIES = frozenset({"Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician"})

# split -> candidate paths under the data folder; a folder means all *.xml files below it.
SPLIT_FILES = {
    "train": ("webnlg2017/train",),
    "dev": ("webnlg2017/dev",),
    "test": ("webnlg2017/test/testdata_with_lex.xml", "webnlg2017/test"),
}

# The challenge release, as an archive of just its folder (the official WebNLG repository).
ARCHIVE_URL = (
    "https://gitlab.com/shimorina/webnlg-dataset/-/archive/master/"
    "webnlg-dataset-master.zip?path=webnlg_challenge_2017"
)
ARCHIVE_FOLDER = "webnlg_challenge_2017"


def _unpack_archive(fetched: list[Path], out: Path) -> None:
    """Unzip the archive and keep its ``webnlg_challenge_2017`` folder as ``out``."""
    (archive,) = fetched
    staging = out.parent / "unzipped"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(staging)  # extractall drops absolute paths and '..' components
    found = sorted(p for p in staging.rglob(ARCHIVE_FOLDER) if p.is_dir())
    if not found or not (found[0] / "train").is_dir():
        raise OSError(f"{archive.name}: no {ARCHIVE_FOLDER}/train folder in the archive")
    shutil.move(str(found[0]), str(out))


RESOURCES = (Resource("webnlg2017", (ARCHIVE_URL,), build=_unpack_archive),)


def load(
    root: Path,
    split: str,
    *,
    categories: Iterable[str] | None = None,
    exclude_categories: Iterable[str] | None = None,
    include_tofix: bool = False,
    underscores_to_spaces: bool = False,
) -> Dataset:
    """Load a WebNLG 2017 split from ``root``.

    ``categories``: keep only entries of these categories; ``exclude_categories``: drop
    these. An unknown category name in either raises ValueError.
    """
    path = locate(root, SPLIT_FILES[split], dataset=NAME, split=split)
    files = sorted(path.rglob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{NAME} split '{split}': no .xml files under {path}")
    entries = [e for f in files for e in read_xml(f)]

    if isinstance(categories, str):
        categories = [categories]
    if isinstance(exclude_categories, str):
        exclude_categories = [exclude_categories]
    known = {e.category for e in entries}
    keep = set(known) if categories is None else set(categories)
    drop = set(exclude_categories or ())
    unknown = (keep | drop) - known
    if unknown:
        raise ValueError(f"unknown WebNLG categories {sorted(unknown)} in {split}; known: {sorted(known)}")
    keep -= drop

    examples: list[Example] = []
    meta: dict[str, dict] = {}
    n_entries = n_lex = 0
    for e in entries:
        if e.category not in keep:
            continue
        n_entries += 1
        n_lex += len(e.lexes)
        source = linearize_triples(e.triples, underscores_to_spaces=underscores_to_spaces)
        refs = [text for comment, text in e.lexes if include_tofix or comment in (None, "good")]
        if refs:
            seen = e.category in SEEN_CATEGORIES
            meta.setdefault(source, {"category": e.category, "seen": seen, "size": len(e.triples)})
        examples.extend(Example(source, ref) for ref in refs)
    info = {
        "files": [str(f) for f in files],
        "entries": n_entries,
        "lexicalisations": n_lex,  # all <lex> of the kept entries, good and toFix
        "categories": sorted(keep),
    }
    return Dataset(NAME, split, examples, meta=meta, info=info)


class Entry(NamedTuple):
    """One parsed ``<entry>``."""

    category: str
    eid: str | None
    triples: list[tuple[str, str, str]]  # modified triples
    lexes: list[tuple[str | None, str]]  # (comment attribute, text) of every <lex>


def read_xml(path: str | Path) -> list[Entry]:
    """Parse one WebNLG XML file. Errors name the file and the entry (0-based index, eid)."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise DataError(f"malformed XML: {e}", path, line=e.position[0]) from None
    entries = []
    for index, entry in enumerate(tree.getroot().iter("entry")):
        eid = entry.get("eid")

        def fail(message: str) -> DataError:
            return DataError(message, path, entry=index, eid=eid)

        category = entry.get("category")
        if not category:
            raise fail("<entry> without a category attribute")
        tripleset = entry.find("modifiedtripleset")
        mtriples = [] if tripleset is None else tripleset.findall("mtriple")
        if not mtriples:
            raise fail("no <modifiedtripleset>/<mtriple> triples")
        triples = []
        for mt in mtriples:
            parts = tuple(p.strip() for p in (mt.text or "").split("|"))
            if len(parts) != 3 or not all(parts):
                raise fail(f"triple {mt.text!r} is not 'subject | property | object'")
            triples.append(parts)
        lexes = []
        for lex in entry.findall("lex"):
            # The enriched WebNLG releases nest the text in <text>; the challenge files don't.
            text = lex.findtext("text") if lex.find("text") is not None else lex.text
            text = (text or "").strip()
            if not text:
                raise fail(f"empty reference (<lex lid={lex.get('lid')!r}>)")
            lexes.append((lex.get("comment"), text))
        entries.append(Entry(category, eid, triples, lexes))
    return entries


def linearize_triples(
    triples: Sequence[Sequence[str]],
    *,
    leading_separator: bool = True,
    lowercase_properties: bool = False,
    underscores_to_spaces: bool = False,
) -> str:
    """``[(s, p, o), ...]`` -> `` | s : p : o | s2 : p2 : o2``.

    WebNLG (as in Li & Liang's code): leading `` | ``, properties as given. DART uses
    ``leading_separator=False, lowercase_properties=True``. ``underscores_to_spaces``
    rewrites ``_`` as a space in subjects and objects (off in the paper's code).
    """
    parts = []
    for s, p, o in triples:
        if lowercase_properties:
            p = p.lower()
        if underscores_to_spaces:
            s, o = s.replace("_", " "), o.replace("_", " ")
        parts.append(f"{s} : {p} : {o}")
    text = " | ".join(parts)
    return " | " + text if leading_separator else text
