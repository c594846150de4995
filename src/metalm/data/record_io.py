"""Reading and writing records: JSONL files streamed line by line, folders of them, Hugging Face
``datasets`` folders; every bad record raises a :class:`RecordError` naming its file, line and field, or is
skipped and counted into a :class:`SkipReport`."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from metalm.data.record_kinds import Record
from metalm.data.record_parsing import RecordError, SkipReport, _Invalid, _parse, record_to_dict

__all__ = ["MAX_LINE_BYTES", "read_jsonl", "read_records", "validate_file", "write_jsonl"]

# A line longer than this is rejected without being held in memory whole. 64 MiB leaves room for
# an inline data: URL of a 20 MB image (base64 adds a third) while bounding memory per line.
MAX_LINE_BYTES = 64 * 1024 * 1024


class _DuplicateKey(Exception):
    pass


class _HugeInt(str):
    """An integer literal over Python's int-string conversion limit (``sys.get_int_max_str_digits``):
    json.loads would raise a bare ValueError; kept as a marker so the field holding it can be named."""


def _parse_int(text: str) -> int | _HugeInt:
    try:
        return int(text)
    except ValueError:
        return _HugeInt(text)


def _huge_int(value: Any) -> str | None:
    """Why `value` (a JSON value, its objects already checked) holds a _HugeInt, or None."""
    if isinstance(value, list):
        return next((r for r in map(_huge_int, value) if r), None)
    if isinstance(value, _HugeInt):
        limit = sys.get_int_max_str_digits()
        return f"integer of {len(value.lstrip('-'))} digits is too long (Python reads at most {limit})"
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of repeated keys; a repeated "text" is almost always a bug.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        huge = _huge_int(value)
        if huge:
            raise _Invalid(key, huge)
        out[key] = value
    return out


def _decode_line(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(
            None,
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start}); re-encode the file as UTF-8",
        ) from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise _Invalid(None, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise _Invalid(None, "invalid JSON: nested too deeply") from None
    except _DuplicateKey as exc:
        raise _Invalid(str(exc), "appears more than once in the object") from None
    huge = _huge_int(value)  # a bare number or list at the top level (in an object, the hook names it)
    if huge:
        raise _Invalid(None, huge)
    return value


def _lines(fh: Any, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) per line; ``None`` for a line over ``max_line_bytes``."""
    lineno = 0
    while True:
        raw = fh.readline(max_line_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while True:  # drain the rest of the oversize line without holding it
                chunk = fh.readline(1 << 20)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield lineno, None
            continue
        yield lineno, raw


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    check_images: bool = False,
    report: SkipReport | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    origins: list[tuple[str, int | None]] | None = None,
) -> Iterator[Record]:
    """Stream the records of a JSONL file, one line at a time (files may exceed memory). With `origins`,
    each yielded record's (file, 1-based line) is appended to it, so later errors can name them.

    Blank lines are skipped. A bad record raises :class:`RecordError` (file, 1-based line, field);
    with ``skip_bad`` it is counted into ``report`` instead. Bad records are never dropped
    silently: with ``skip_bad`` and no ``report``, a warning with the summary is issued at the end.
    Relative image paths resolve against the file's folder.
    """
    shown = os.fspath(path)
    base_dir = Path(os.path.abspath(path)).parent
    own_report = report is None and skip_bad
    rep = report if report is not None else SkipReport()
    with open(path, "rb") as fh:
        for lineno, raw in _lines(fh, max_line_bytes):
            try:
                if raw is None:
                    raise _Invalid(None, f"line longer than {max_line_bytes:,} bytes")
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # tolerate a UTF-8 byte-order mark written by some editors
                if not raw.strip():
                    continue
                record = _parse(_decode_line(raw), base_dir, check_images)
            except _Invalid as exc:
                err = RecordError(exc.reason, path=shown, line=lineno, field=exc.field)
                if not skip_bad:
                    raise err from None
                rep.add(err)
                continue
            if origins is not None:
                origins.append((shown, lineno))
            yield record
    if own_report and rep.count:
        warnings.warn(rep.summary(), stacklevel=2)


def _is_hf_dataset_dir(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_hf(
    folder: Path,
    skip_bad: bool,
    check_images: bool,
    report: SkipReport,
    origins: list[tuple[str, int | None]] | None = None,
) -> Iterator[Record]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise ValueError(
            f"{folder} is a Hugging Face datasets folder, but the 'datasets' package is not installed; "
            "install it, or export the rows to JSONL"
        ) from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(
            f"{folder} holds a DatasetDict (splits: {', '.join(ds)}); pass the folder of one split, "
            f"e.g. {folder / next(iter(ds))}"
        )
    for i, row in enumerate(ds):
        try:
            # Columns a row does not use come back as None in a mixed-kind table.
            obj = {k: v for k, v in row.items() if v is not None}
            record = _parse(obj, folder, check_images)
        except _Invalid as exc:
            err = RecordError(exc.reason, path=f"{folder}[row {i}]", line=None, field=exc.field)
            if not skip_bad:
                raise err from None
            report.add(err)
            continue
        if origins is not None:
            origins.append((f"{folder}[row {i}]", None))
        yield record


def read_records(
    source: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    check_images: bool = False,
    report: SkipReport | None = None,
    origins: list[tuple[str, int | None]] | None = None,
) -> Iterator[Record]:
    """Stream records from a ``.jsonl`` file, a folder of ``.jsonl`` files (sorted by name), or a
    Hugging Face ``datasets`` folder written by ``save_to_disk`` (needs ``datasets`` installed).
    Error handling and `origins` as in :func:`read_jsonl`."""
    src = Path(source)
    own_report = report is None and skip_bad
    rep = report if report is not None else SkipReport()
    if src.is_dir():
        if _is_hf_dataset_dir(src):
            yield from _read_hf(src, skip_bad, check_images, rep, origins)
        else:
            files = sorted(p for p in src.iterdir() if p.suffix == ".jsonl" and p.is_file())
            if not files:
                raise FileNotFoundError(f"{src}: no .jsonl files in this folder")
            for file in files:
                yield from read_jsonl(
                    file, skip_bad=skip_bad, check_images=check_images, report=rep, origins=origins
                )
    elif src.is_file():
        yield from read_jsonl(src, skip_bad=skip_bad, check_images=check_images, report=rep, origins=origins)
    else:
        raise FileNotFoundError(f"{src}: no such file or folder")
    if own_report and rep.count:
        warnings.warn(rep.summary(), stacklevel=2)


def validate_file(
    path: str | os.PathLike[str], skip_bad: bool = False, check_images: bool = False
) -> tuple[int, SkipReport]:
    """Read every record of ``path`` (file or folder, as :func:`read_records`).

    Returns (number of good records, report of skipped ones). Without ``skip_bad`` the first bad
    record raises :class:`RecordError`.
    """
    report = SkipReport()
    n_ok = 0
    for _ in read_records(path, skip_bad=skip_bad, check_images=check_images, report=report):
        n_ok += 1
    return n_ok, report


def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> int:
    """Write records as JSONL (the inverse of :func:`read_jsonl`); returns the number written.

    Image paths under the output file's folder are stored relative to it, others absolute, so a
    folder holding the JSONL and its images can be moved as a whole. The file is written to a
    temporary name and renamed, so an interrupted write never leaves a truncated file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base_dir = out.parent
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for record in records:
                fh.write(json.dumps(record_to_dict(record, base_dir=base_dir), ensure_ascii=False))
                fh.write("\n")
                n += 1
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n
