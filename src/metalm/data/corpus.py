"""The ``text_corpus`` pre-training corpus: English prose extracted from Debian documentation and dictionaries.

==============  =====================  ===================================================================
source          Debian package         one document is
==============  =====================  ===================================================================
``linux``       ``linux-doc-6.1``      a kernel documentation page (reStructuredText, ``*.rst.gz``)
``python``      ``python3.11-doc``     a page of the Python manuals (reStructuredText sources)
``perl``        ``perl-doc``           a Perl manual page (POD)
``postgresql``  ``postgresql-doc-15``  a page of the PostgreSQL manual (HTML)
``sqlite``      ``sqlite3-doc``        a page of the SQLite documentation (HTML)
``octave``      ``octave-doc``         a page of the GNU Octave manual (HTML)
``gimp``        ``gimp-help-en``       a page of the GIMP user manual (HTML)
``gcide``       ``dict-gcide``         every entry of one headword of the GCIDE dictionary
``foldoc``      ``dict-foldoc``        one entry of the Free On-line Dictionary of Computing
``wordnet``     ``wordnet-base``       up to 16 consecutive WordNet synsets of one lexicographer file
==============  =====================  ===================================================================

Left out on purpose: the kernel's ``translations/`` (not English) and ``devicetree/`` (property lists, not
prose), the Python docs' ``whatsnew/`` and Perl's ``*delta.pod`` change lists. Code blocks, tables, directives
and comments are dropped; inline markup keeps its text (``:ref:`Foo <bar>``` -> ``Foo``).

``metalm data text-corpus`` extracts the corpus once into ``<metalm cache>/text_corpus/v1/<split>.jsonl``
(``$METALM_CACHE``, default ``~/.cache/metalm``) with ``stats.json`` (documents, characters and MiniLM tokens
per source and split). Splits are by document: ``split_of("<source>/<path or headword>", *CORPUS_SPLIT)``
(96 % train, 2 % validation, 2 % test). The lexical tasks (``metalm.data.lexical``) split their examples by
the same keys, so no validation or test example of theirs is in the training split here. docs/data.md has
the sizes and licences.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from metalm.data.gcide import _BRACES, GCIDE_DICT, clean_gcide_entry, gcide_entries
from metalm.data.records import TextDocument, read_jsonl, write_jsonl
from metalm.data.splits import CORPUS_SPLIT, SPLITS, split_of
from metalm.data.text_files import read_text_file

logger = logging.getLogger(__name__)

__all__ = [
    "CORPUS_SOURCES",
    "CORPUS_SPLIT",
    "CorpusNotBuilt",
    "build_text_corpus",
    "clean_gcide_entry",
    "clean_rst",
    "corpus_dir",
    "gcide_entries",
    "load_text_corpus",
    "read_text_file",
    "rst_documents",
]

VERSION = "v1"
# Percent of documents (by split-key bucket) for train and validation; the rest is test.
LINUX_DOC = Path("/usr/share/doc/linux-doc-6.1/Documentation")
PYTHON_DOC = Path("/usr/share/doc/python3.11/html/_sources")
FOLDOC_DICT = Path("/usr/share/dictd/foldoc.dict.dz")
PERL_POD = Path("/usr/share/perl/5.36.0/pod")
POSTGRES_DOC = Path("/usr/share/doc/postgresql-doc-15/html")
SQLITE_DOC = Path("/usr/share/doc/sqlite3")
OCTAVE_DOC = Path("/usr/share/doc/octave/octave.html")
GIMP_DOC = Path("/usr/share/gimp/2.0/help/en")
# Folders that are not English prose.
LINUX_SKIP = ("translations", "devicetree")
PYTHON_SKIP = ("whatsnew",)
# A document shorter than this (characters, after cleaning) is left out: a stub or an index page.
MIN_CHARS = 200


# Documents per split as `metalm data text-corpus` extracts them from the Debian 12 packages (measured).
TEXT_CORPUS_SIZES = {"train": 128729, "validation": 2601, "test": 2615}


class CorpusNotBuilt(FileNotFoundError):
    """``text_corpus`` is read before ``metalm data text-corpus`` extracted it."""


def corpus_dir() -> Path:
    """Where the extracted corpus lives: ``<metalm cache>/text_corpus/v1``."""
    from metalm.model.packaged import metalm_cache_dir

    return metalm_cache_dir() / "text_corpus" / VERSION


# --------------------------------------------------------------------------------------------
# reStructuredText -> prose

_ROLE = re.compile(r":[a-zA-Z:+-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`")  # :ref:`Text <target>` -> Text
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")  # `Text <url>`_ -> Text
_LITERAL = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_REF = re.compile(r"`([^`]+)`_{0,2}")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\.(\s+([\w:-]+)::)?")
# Directives whose body is code, markup or a list of links; the body of any other directive (function,
# note, admonitions ...) is prose and kept. A comment (".." without "::") is skipped with its body.
_CODE_DIRECTIVES = frozenset(
    "code-block code sourcecode literalinclude toctree image figure table csv-table list-table flat-table "
    "productionlist doctest testcode testoutput testsetup testcleanup highlight index raw math kernel-doc "
    "kernel-include kernel-abi include graphviz contents only tabularcolumns sectionauthor moduleauthor "
    "kernel-feat kernel-figure kernel-render parsed-literal code-cell c:macro cssclass".split()
)
_TABLE = re.compile(r"^\s*[+|].*[|+]\s*$|^\s*=+(\s+=+)+\s*$")
_FIELD = re.compile(r"^:[\w -]+:")


def _inline(text: str) -> str:
    for pattern in (_ROLE, _LINK, _LITERAL, _EMPHASIS, _REF):
        text = pattern.sub(r"\1", text)
    return text.replace("\\", "")


def _is_prose(block: list[str]) -> bool:
    text = " ".join(block)
    letters = sum(c.isalpha() or c == " " for c in text)
    return len(text.split()) >= 4 and letters >= 0.75 * len(text) and not text.startswith(">>>")


def clean_rst(source: str) -> str:
    """The prose of a reStructuredText page: headings and paragraphs, one per line block, blank-line
    separated; literal blocks (after ``::``), directives with their bodies, comments, tables, field lists
    and blocks that are mostly symbols are dropped."""
    blocks, block = [], []
    skip_indent: int | None = None  # inside a literal block / directive: skip lines indented deeper
    for raw in source.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if not line.strip():
            blocks.append(block)
            block = []
            continue
        directive = _DIRECTIVE.match(line)
        if directive and (line.strip() == ".." or line.lstrip()[2:3].isspace()):
            name = directive.group(2)
            if name is None or name in _CODE_DIRECTIVES or "|" in line.split("::")[0]:
                skip_indent = indent  # a comment, a target or a code-like directive: its body goes too
            blocks.append(block)
            block = []
            continue
        if _UNDERLINE.match(line) or _TABLE.match(line) or _FIELD.match(line.strip()):
            continue
        if line.endswith("::"):
            skip_indent = indent
            line = line[:-1] if not line.endswith(" ::") and len(line.strip()) > 2 else line[:-2]
        block.append(line.strip())
    blocks.append(block)
    paragraphs = [_inline(" ".join(b)).strip() for b in blocks if b and _is_prose(b)]
    return "\n\n".join(p for p in paragraphs if p)


def rst_documents(root: Path, pattern: str, skip: tuple[str, ...], source: str) -> Iterator[TextDocument]:
    """Cleaned pages under ``root`` (files matching ``pattern``, top-level folders in ``skip`` left out),
    in path order, ids ``<source>/<relative path>``."""
    for path in sorted(root.rglob(pattern)):
        rel = path.relative_to(root)
        if rel.parts[0] in skip:
            continue
        text = clean_rst(read_text_file(path))
        if len(text) >= MIN_CHARS:
            yield TextDocument(text=text, id=f"{source}/{rel.as_posix()}")


# --------------------------------------------------------------------------------------------
# GCIDE (the 1913 Webster plus later additions, in dictd's text format)


def gcide_documents(path: Path = GCIDE_DICT) -> Iterator[TextDocument]:
    """One document per headword (lower-cased; all its entries, in dictionary order, even where the
    dictionary lists them apart), ids ``gcide/<headword>``, in order of first appearance."""
    parts: dict[str, list[str]] = {}
    for head, entry in gcide_entries(read_text_file(path)):
        cleaned = clean_gcide_entry(entry)
        if cleaned:
            parts.setdefault(head.lower(), []).append(cleaned)
    for key, texts in parts.items():
        yield TextDocument(text="\n".join(texts), id=f"gcide/{key}")


# --------------------------------------------------------------------------------------------
# Perl's POD and HTML manuals

_POD_INDEX = re.compile(r"X<[^<>]*>")
_POD_LINK = re.compile(r"L<([^<>|]*)\|[^<>]*>")
_POD_CODE = re.compile(r"[A-Z]<<+\s*(.*?)\s*>+>|[A-Z]<([^<>]*)>")
_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def clean_pod(source: str) -> str:
    """The prose of a POD page: ``=head``/``=item`` texts and ordinary paragraphs, formatting codes kept as
    their text; verbatim (indented) paragraphs, other commands and symbol-heavy paragraphs dropped."""
    out = []
    for para in re.split(r"\n\s*\n", source):
        if not para.strip() or para[:1].isspace():
            continue
        if para.startswith("="):
            command, _, rest = para.partition(" ")
            if not command.startswith(("=head", "=item")):
                continue
            para = rest
        text = _POD_INDEX.sub("", para)
        text = re.sub(r"E<(\w+)>", lambda m: _POD_ENTITIES.get(m.group(1), ""), text)
        text = _POD_LINK.sub(r"\1", text)
        for _ in range(3):  # nested codes: B<C<x>>
            text = _POD_CODE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
        block = text.split()
        if block and _is_prose(block):
            out.append(" ".join(block))
    return "\n\n".join(out)


def pod_documents(root: Path, source: str) -> Iterator[TextDocument]:
    """Cleaned ``*.pod`` pages under ``root`` (``*delta.pod`` change lists left out)."""
    for path in sorted(root.glob("*.pod")):
        if path.stem.endswith("delta"):
            continue
        text = clean_pod(read_text_file(path))
        if len(text) >= MIN_CHARS:
            yield TextDocument(text=text, id=f"{source}/{path.name}")


class _HTMLProse(HTMLParser):
    """Text of the prose blocks of an HTML page (paragraphs, headings, list items, definitions); code
    (``pre``), tables (navigation bars included), scripts and styles are skipped."""

    BLOCKS = frozenset("p h1 h2 h3 h4 li dt dd".split())
    SKIP = frozenset("pre table script style".split())

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] | None = None
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS and not self.skipping:
            self._close()
            self.current = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self._close()

    def handle_data(self, data: str) -> None:
        if self.current is not None and not self.skipping:
            self.current.append(data)

    def _close(self) -> None:
        if self.current:
            words = "".join(self.current).split()
            navigation = words[:1] in (["Next:"], ["Previous:"], ["Purchase"]) or "¶" in words
            if words and not navigation and _is_prose(words):
                self.blocks.append(" ".join(words))
        self.current = None


def clean_html(source: str) -> str:
    parser = _HTMLProse()
    parser.feed(source)
    parser.close()
    return "\n\n".join(parser.blocks)


def html_documents(root: Path, source: str) -> Iterator[TextDocument]:
    """Cleaned ``*.html`` pages under ``root`` (recursively), ids ``<source>/<relative path>``."""
    for path in sorted(p for p in root.rglob("*.html") if p.is_file()):
        text = clean_html(read_text_file(path))
        if len(text) >= MIN_CHARS:
            yield TextDocument(text=text, id=f"{source}/{path.relative_to(root).as_posix()}")


def foldoc_documents(path: Path = FOLDOC_DICT) -> Iterator[TextDocument]:
    """One document per FOLDOC headword (lower-cased; entries of the same headword joined): the headword, then
    the body with ``{cross references}`` unbraced, ``<domain>`` tags and the closing ``(date)`` removed."""
    bodies: dict[str, tuple[str, list[str]]] = {}
    for head, entry in gcide_entries(read_text_file(path)):
        body = entry.split("\n", 1)[1] if "\n" in entry else ""
        body = _BRACES.sub("", re.sub(r"^\s*<[^>\n]*>\s*|\(\d{4}-\d\d-\d\d\)\s*$", "", body.strip()))
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
        bodies.setdefault(head.lower(), (head, []))[1].extend(p for p in paragraphs if p)
    for key, (head, paragraphs) in bodies.items():
        text = "\n".join([head, *paragraphs])
        if len(text) >= MIN_CHARS // 2:
            yield TextDocument(text=text, id=f"foldoc/{key}")


# --------------------------------------------------------------------------------------------
# Building and loading

CORPUS_SOURCES: dict[str, tuple[str, Callable[[], Iterator[TextDocument]]]] = {
    "linux": ("linux-doc-6.1", lambda: rst_documents(LINUX_DOC, "*.rst.gz", LINUX_SKIP, "linux")),
    "python": ("python3.11-doc", lambda: rst_documents(PYTHON_DOC, "*.txt", PYTHON_SKIP, "python")),
    "gcide": ("dict-gcide", gcide_documents),
    "wordnet": ("wordnet-base", lambda: _wordnet_documents()),
    "perl": ("perl-doc", lambda: pod_documents(PERL_POD, "perl")),
    "postgresql": ("postgresql-doc-15", lambda: html_documents(POSTGRES_DOC, "postgresql")),
    "foldoc": ("dict-foldoc", lambda: foldoc_documents()),
    "sqlite": ("sqlite3-doc", lambda: html_documents(SQLITE_DOC, "sqlite")),
    "octave": ("octave-doc", lambda: html_documents(OCTAVE_DOC, "octave")),
    "gimp": ("gimp-help-en", lambda: html_documents(GIMP_DOC, "gimp")),
}


def _wordnet_documents() -> Iterator[TextDocument]:
    from metalm.data.lexical import wordnet_documents

    return wordnet_documents()


def _token_counter() -> Callable[[list[str]], list[int]]:
    from transformers import AutoTokenizer

    from metalm.model.packaged import packaged_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    return lambda texts: [
        len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    ]


def build_text_corpus(
    out_dir: Path | None = None,
    sources: dict[str, tuple[str, Callable[[], Iterator[TextDocument]]]] | None = None,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
) -> dict[str, dict[str, dict[str, int]]]:
    """Extract every source into ``<out_dir>/{train,validation,test}.jsonl`` and ``stats.json``; returns the
    stats: ``{source: {split: {"documents": n, "tokens": n, "characters": n}}}`` (tokens: MiniLM WordPiece)."""

    out = Path(out_dir) if out_dir is not None else corpus_dir()
    out.mkdir(parents=True, exist_ok=True)
    count = count_tokens or _token_counter()
    docs: dict[str, list[TextDocument]] = {s: [] for s in SPLITS}
    stats: dict[str, dict[str, dict[str, int]]] = {}
    for name, (package, documents) in (sources or CORPUS_SOURCES).items():
        found = list(documents())
        if not found:
            raise FileNotFoundError(f"text_corpus: no documents from {name!r}: apt-get install {package}")
        per_split = {s: {"documents": 0, "tokens": 0, "characters": 0} for s in SPLITS}
        for start in range(0, len(found), 256):  # the tokenizer is much faster on batches
            batch = found[start : start + 256]
            for doc, tokens in zip(batch, count([d.text for d in batch])):
                split = split_of(doc.id or "", *CORPUS_SPLIT)
                docs[split].append(doc)
                row = per_split[split]
                row["documents"] += 1
                row["tokens"] += tokens
                row["characters"] += len(doc.text)
        stats[name] = per_split
        logger.info("text_corpus: %s: %d documents", name, len(found))
    for split, records in docs.items():
        write_jsonl(records, out / f"{split}.jsonl")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def load_text_corpus(split: str, folder: Path | None = None) -> list[TextDocument]:
    """The extracted corpus's documents of ``split``."""
    path = (folder or corpus_dir()) / f"{split}.jsonl"
    if not path.is_file():
        raise CorpusNotBuilt(
            f"the text corpus is not extracted yet: run `metalm data text-corpus` (needs the Debian packages "
            f"linux-doc-6.1, python3.11-doc, dict-gcide; `make setup` installs them; it writes {path.parent})"
        )
    return [r for r in read_jsonl(path) if isinstance(r, TextDocument)]
