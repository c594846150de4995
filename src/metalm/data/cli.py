"""`metalm data`: list the built-in datasets, export them as JSONL, generate the speech data sets, extract the
text corpus, validate JSONL files."""

from __future__ import annotations

import argparse
import sys


def list_datasets() -> None:
    from metalm.data.builtin import BUILTIN_DATASETS

    print(f"{'name':<20} {'kind':<15} {'train':>7} {'valid':>7} {'test':>7}  description")
    for name, ds in BUILTIN_DATASETS.items():
        sizes = ds.sizes or {}
        row = [str(sizes.get(s, "?")) for s in ("train", "validation", "test")]
        print(f"{name:<20} {ds.kind:<15} {row[0]:>7} {row[1]:>7} {row[2]:>7}  {ds.description}")


def export(name: str, split: list[str], out: str, fmt: str = "jsonl", per_shard: int = 10_000) -> None:
    from metalm.data.builtin import export_builtin, load_builtin

    for s in split:
        if fmt == "jsonl":
            print(f"wrote {export_builtin(name, s, out)}")
            continue
        from metalm.data.shard_writer import write_shards

        paths = write_shards(load_builtin(name, s), out, fmt=fmt, per_shard=per_shard, prefix=f"{name}-{s}")
        print(f"wrote {len(paths)} {fmt} shard(s): {paths[0].parent}/{name}-{s}-*{paths[0].suffix}")


def validate(files: list[str], skip_bad: bool = False, check_images: bool = False) -> int:
    """Validate JSONL files; exit status 1 if any record is bad."""
    from metalm.data.records import RecordError, validate_file

    bad_total = 0
    for f in files:
        try:
            n_ok, report = validate_file(f, skip_bad=skip_bad, check_images=check_images)
        except RecordError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        bad_total += report.count
        print(f"{f}: {n_ok} good records, {report.count} bad")
        if report.count:
            print(report.summary(), file=sys.stderr)
    return 1 if bad_total else 0


def speech(names: list[str] | None, splits: list[str] | None) -> None:
    """Generate the speech data sets with espeak-ng (resumable; clips already on disk are kept)."""
    import time

    from metalm.data.speech import SPEECH_DATASETS, generate_speech, speech_dir

    start = time.perf_counter()
    counts = generate_speech(
        tuple(names or SPEECH_DATASETS), tuple(splits or ("train", "validation", "test"))
    )
    for name, sizes in counts.items():
        print(f"{name}: " + ", ".join(f"{split} {n}" for split, n in sizes.items()))
    print(f"wrote {speech_dir()} in {time.perf_counter() - start:.0f} s")


def text_corpus(out: str | None) -> None:
    """Extract the pre-training corpus from the installed Debian packages (about 3 minutes)."""
    import logging
    import time
    from pathlib import Path

    from metalm.data.corpus import build_text_corpus, corpus_dir

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    folder = Path(out) if out else corpus_dir()
    stats = build_text_corpus(folder)
    print(f"{'source':<12} {'train docs':>10} {'train tokens':>13} {'valid tokens':>13} {'test tokens':>12}")
    for name, by_split in stats.items():
        print(
            f"{name:<12} {by_split['train']['documents']:>10,} {by_split['train']['tokens']:>13,} "
            f"{by_split['validation']['tokens']:>13,} {by_split['test']['tokens']:>12,}"
        )
    total = {s: sum(v[s]["tokens"] for v in stats.values()) for s in ("train", "validation", "test")}
    print(f"{'all':<12} {'':>10} {total['train']:>13,} {total['validation']:>13,} {total['test']:>12,}")
    print(f"wrote {folder} in {time.perf_counter() - start:.0f} s (tokens: MiniLM WordPiece)")


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="list, export and validate datasets", description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the built-in datasets with their split sizes")
    ls.set_defaults(func=lambda a: list_datasets())
    ex = sub.add_parser(
        "export", help="write a built-in dataset as JSONL (+ images) in the documented schema"
    )
    ex.add_argument("name", help="built-in dataset name (see `metalm data list`)")
    ex.add_argument(
        "--split", action="append", choices=["train", "validation", "test"], help="repeatable; default all"
    )
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument(
        "--format",
        choices=["jsonl", "webdataset", "parquet"],
        default="jsonl",
        help="jsonl (default; images copied beside it) or shards that a stream reads as it streams: "
        "webdataset tar (img2dataset layout) or parquet",
    )
    ex.add_argument("--shard-size", type=int, default=10_000, help="records per shard (webdataset, parquet)")
    ex.set_defaults(
        func=lambda a: export(
            a.name, a.split or ["train", "validation", "test"], a.out, a.format, a.shard_size
        )
    )
    sp = sub.add_parser(
        "speech",
        help="generate the spoken data sets (speech_bbc, speech_easy_vqa) into the metalm cache with espeak-ng",
    )
    sp.add_argument("--name", action="append", choices=["speech_bbc", "speech_easy_vqa"], help="repeatable")
    sp.add_argument("--split", action="append", choices=["train", "validation", "test"], help="repeatable")
    sp.set_defaults(func=lambda a: speech(a.name, a.split))
    tc = sub.add_parser(
        "text-corpus",
        help="extract the text_corpus pre-training corpus from installed Debian packages into the metalm cache",
    )
    tc.add_argument("--out", default=None, help="output folder (default: the metalm cache)")
    tc.set_defaults(func=lambda a: text_corpus(a.out))
    va = sub.add_parser("validate", help="check JSONL files against the schema (file:line: field errors)")
    va.add_argument("files", nargs="+")
    va.add_argument(
        "--skip-bad", action="store_true", help="count and list bad records instead of stopping at the first"
    )
    va.add_argument("--check-images", action="store_true", help="also open every image")
    va.set_defaults(func=lambda a: validate(a.files, a.skip_bad, a.check_images))
