"""The text corpus and the lexical tasks: extraction, cleaning and splitting on small fixture text; the real
Debian packages only in slow tests (skipped where they are not installed)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metalm.data import corpus as C
from metalm.data import lexical as L
from metalm.data.builtin import split_of
from metalm.data.records import Classification, TextDocument

RST = """\
.. _label:

======================
The Title of This Page
======================

Short title
-----------

This paragraph has ``literal`` text, a :ref:`cross reference <target>` and a `link <http://x>`_ in it.

Example::

    $ make something
    more code

.. code-block:: c

   int main(void) { return 0; }

.. note::

   Notes are prose and stay in the document text.

.. this is a comment
   spanning two lines

+-----+-----+
| a   | b   |
+-----+-----+

A final paragraph that is prose enough to keep.
"""

GCIDE = """\
00-database-info
   This is the header.

Abaca \\Ab"a*ca\\ ([a^]b"[.a]*k[.a]), n. [The native name.]
   The Manila-hemp plant ({Musa textilis}); also, its fiber.
   [1913 Webster]

Aback \\A*back"\\ ([.a]*b[a^]k"), adv. [Pref. a- + back.]
   1. Toward the back or rear; backward.
      [1913 Webster]

   2. Behind; in the rear. --Knolles.
      [1913 Webster]

Aback \\Ab"ack\\ ([a^]b"ak), n.
   An abacus. [Obs.] --B. Jonson.
   [1913 Webster]

Abacinate \\A*bac"i*nate\\, v. t. [LL. abacinatus.]
   To blind by a red-hot metal plate held before the eyes. [R.]
   [1913 Webster]
"""


def test_clean_rst_keeps_prose_and_drops_code_comments_and_tables() -> None:
    text = C.clean_rst(RST)
    paragraphs = text.split("\n\n")
    assert paragraphs[0] == "The Title of This Page"
    assert "Short title" not in text  # a block of fewer than 4 words is dropped
    assert "This paragraph has literal text, a cross reference and a link in it." in paragraphs
    assert "Notes are prose and stay in the document text." in paragraphs
    assert "A final paragraph that is prose enough to keep." in paragraphs
    for gone in ("make something", "int main", "comment", "| a", "label", "===", "::"):
        assert gone not in text


def test_clean_pod_and_html() -> None:
    pod = (
        "=head1 A Heading Of Words\nX<index>\n\n=over 4\n\n"
        "perlfoo - does B<bold> things with C<code> and L<links|perlsyn>\n\n    verbatim code\n"
    )
    assert C.clean_pod(pod) == "A Heading Of Words\n\nperlfoo - does bold things with code and links"
    html = (
        "<div class='navheader'><table><tr><td>Prev Next Up Home</td></tr></table></div>"
        "<h2>Section title words here</h2><p>A paragraph of <code>prose</code> with words.</p>"
        "<pre>select * from t;</pre><p>Next: somewhere else entirely</p>"
    )
    assert C.clean_html(html) == "Section title words here\n\nA paragraph of prose with words."


def test_gcide_entries_are_grouped_by_headword_and_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "gcide.dict.dz"
    path.write_bytes(gzip.compress(GCIDE.encode()))  # dictzip is gzip-compatible
    docs = list(C.gcide_documents(path))
    assert [d.id for d in docs] == ["gcide/abaca", "gcide/aback", "gcide/abacinate"]
    assert (
        docs[0].text
        == "Abaca , n. [The native name.] The Manila-hemp plant (Musa textilis); also, its fiber."
    )
    assert "An abacus." in docs[1].text and "Behind; in the rear." in docs[1].text  # both Aback entries
    for marker in ("[1913 Webster]", "\\", "{", "[a^]"):
        assert marker not in "".join(d.text for d in docs)


def test_gcide_definitions_give_part_of_speech_and_first_sense() -> None:
    found = list(L.gcide_definitions(GCIDE))
    assert found == [
        ("abaca", "noun", "The Manila-hemp plant (Musa textilis); also, its fiber."),
        ("aback", "adverb", "Toward the back or rear; backward."),
        ("abacinate", "verb", "To blind by a red-hot metal plate held before the eyes."),
    ]  # "An abacus." is too short (fewer than 3 words)


WORDNET = """\
  1 This software and database is being provided to you, the LICENSEE, by
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its own distinct existence
00015388 05 n 02 animal 0 animate_being 0 000 | a living organism characterized by voluntary movement
00017222 20 n 01 plant 0 000 | (botany) a living organism lacking the power of locomotion
"""


def test_wordnet_synsets_documents_and_categories(tmp_path: Path) -> None:
    (tmp_path / "data.noun").write_text(WORDNET)
    synsets = L.wordnet_synsets("noun", tmp_path)
    assert [s.lexname for s in synsets] == ["noun.Tops", "noun.animal", "noun.plant"]
    assert synsets[1].words == ("animal", "animate being")
    records = [r for split in ("train", "validation", "test") for r in L.wordnet_category(split, tmp_path)]
    # Three classes of one synset each, all kept (balanced), each in its document's split.
    assert sorted(r.label for r in records) == ["Tops", "animal", "plant"]
    for r in records:
        key = f"wordnet/noun/{r.id.rsplit('/', 1)[1]}"
        assert r in L.wordnet_category(split_of(key, *C.CORPUS_SPLIT), tmp_path)


def test_balanced_keeps_the_rarest_class_count_and_order() -> None:
    records = [Classification(text=str(i), label="a" if i % 3 else "b", id=str(i)) for i in range(9)]
    kept = L.balanced(records)
    assert [r.label for r in kept].count("a") == [r.label for r in kept].count("b") == 3
    assert [int(r.id) for r in kept] == sorted(int(r.id) for r in kept)


def test_build_text_corpus_splits_by_document_and_counts(tmp_path: Path) -> None:
    docs = [TextDocument(text=f"document number {i} " * 20, id=f"fake/{i}") for i in range(200)]
    sources = {"fake": ("fake-package", lambda: iter(docs))}
    stats = C.build_text_corpus(tmp_path, sources, count_tokens=lambda texts: [len(t.split()) for t in texts])
    loaded = {s: C.load_text_corpus(s, tmp_path) for s in ("train", "validation", "test")}
    assert sum(len(v) for v in loaded.values()) == 200
    for split, records in loaded.items():
        assert all(split_of(r.id, *C.CORPUS_SPLIT) == split for r in records)
        assert stats["fake"][split]["documents"] == len(records)
        assert stats["fake"][split]["tokens"] == 60 * len(records)
    assert (tmp_path / "stats.json").is_file()
    with pytest.raises(C.CorpusNotBuilt, match="metalm data text-corpus"):
        C.load_text_corpus("train", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="apt-get install nothing"):
        C.build_text_corpus(tmp_path, {"none": ("nothing", lambda: iter(()))}, count_tokens=lambda t: [])


def test_lexical_tasks_are_registered() -> None:
    from metalm.evaluation.tasks import BUILTIN_TASKS, builtin_task

    for name in ("wordnet-category", "wordnet-category-options", "gcide-pos", "gcide-pos-options"):
        assert name in BUILTIN_TASKS
    assert builtin_task("gcide-pos").options == ("adjective", "adverb", "noun", "verb")
    assert builtin_task("wordnet-category-options").input_template.endswith("OPTIONS: {options} TARGET:")


needs_packages = pytest.mark.skipif(
    not (L.WORDNET_DIR / "data.noun").is_file() or not C.GCIDE_DICT.is_file(),
    reason="wordnet-base / dict-gcide not installed (make setup installs them)",
)


@pytest.mark.slow
@needs_packages
def test_lexical_tasks_from_the_installed_packages_match_the_registry() -> None:
    from metalm.data.builtin import BUILTIN_DATASETS

    for name, load in (("wordnet_category", L.wordnet_category), ("gcide_pos", L.gcide_pos)):
        for split in ("train", "validation", "test"):
            records = load(split)
            assert len(records) == BUILTIN_DATASETS[name].sizes[split]
            labels = {r.label for r in records}
            # No `substance` document fell into the validation split (its 432 glosses have 9 classes).
            missing = 1 if (name, split) == ("wordnet_category", "validation") else 0
            assert len(labels) == (10 if name == "wordnet_category" else 4) - missing


@pytest.mark.slow
@pytest.mark.skipif(
    not (C.corpus_dir() / "train.jsonl").is_file(), reason="run `metalm data text-corpus` first"
)
def test_paper_claims_smoke_writes_the_page(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(repo / "scripts" / "paper_claims.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "paper-claims.md").read_text()
    assert "Smoke run" in page and "Claim 1" in page and "Claim 3" in page
    assert (tmp_path / "paper-claims.png").stat().st_size > 10_000
    assert (tmp_path / "results.json").is_file()
