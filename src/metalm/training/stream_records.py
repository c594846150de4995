"""A data stream's records for one split: read from a built-in data set or JSONL files, checked against the
stream's ``kind``, a held-out validation fraction split off, capped at ``data.max_records``."""

from __future__ import annotations

from dataclasses import dataclass

from metalm.data.records import Classification, Record, RecordError, SkipReport, read_records
from metalm.training.config import DataConfig, StreamConfig

__all__ = ["StreamRecords", "load_stream_records"]


@dataclass
class StreamRecords:
    """One stream's records for one split. ``config``: the stream's settings (sample format, instruction
    templates; None = the defaults); ``options``: the labels a classification template writes in."""

    name: str
    weight: float
    records: list[Record]
    config: StreamConfig | None = None
    options: tuple[str, ...] | None = None
    # (file, line) per record, when read from files: errors found later name them.
    origins: list[tuple[str, int | None] | None] | None = None


# --------------------------------------------------------------------------------------------
# Loading records


def _subsample(records: list[Record], limit: int | None) -> list[Record]:
    # Evenly spaced, so a capped built-in keeps all its classes (they are stored class by class).
    if limit is None or len(records) <= limit:
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def load_stream_records(
    stream: StreamConfig, data: DataConfig, split: str, report: SkipReport | None = None
) -> StreamRecords | None:
    """Records of ``stream`` for ``split`` ("train" or "validation"); None when the stream has no
    validation records. Bad JSONL records raise :class:`RecordError`, or with ``data.skip_bad`` are
    counted into ``report``."""
    from metalm.data.builtin import BUILTIN_DATASETS, load_builtin

    name = stream.name or stream.source
    if stream.sharded:  # read as it streams, by each process (metalm.training.streaming)
        from metalm.training.streaming import sharded_stream_records

        return sharded_stream_records(stream, split)
    holdout = stream.validation_fraction is not None
    if split == "train" or holdout:  # a held-out fraction comes out of the training records
        source, builtin_split = stream.source, stream.split
    else:
        source, builtin_split = stream.validation_source, stream.validation_split
        if source is None:
            if stream.source not in BUILTIN_DATASETS or stream.validation_split is None:
                return None
            source = stream.source
        builtin_split = builtin_split or "validation"
    found: list[tuple[str, int | None]] = []  # (file, line) of each record read from files
    where: dict[int, tuple[str, int | None]] = {}  # by record object: they survive hold-out and subsampling
    if source in BUILTIN_DATASETS:
        records = load_builtin(source, builtin_split, kind=stream.kind)
    else:
        records = []
        report = report if report is not None else SkipReport()
        for rec in read_records(
            source, skip_bad=data.skip_bad, check_images=data.check_images, report=report, origins=found
        ):
            where[id(rec)] = found[-1]
            if stream.kind is not None and rec.kind != stream.kind:
                err = RecordError(
                    f"record of kind {rec.kind!r} in stream {name!r}, which takes kind {stream.kind!r}",
                    path=source,
                    field="kind",
                )
                if not data.skip_bad:
                    raise err
                report.add(err)
                continue
            records.append(rec)
    if holdout:
        from metalm.training.holdout import split_holdout

        try:
            parts = split_holdout(records, stream.validation_fraction, stream.validation_seed)
        except ValueError as err:
            raise ValueError(f"stream {name!r} ({source}): {err}") from None
        records = parts[0] if split == "train" else parts[1]
    records = _subsample(list(records), data.max_records)
    if not records:
        raise ValueError(f"stream {name!r} ({source}, {split}): no records")
    options = None
    if stream.supervised and any(isinstance(r, Classification) for r in records):
        if stream.options is not None:
            options = tuple(stream.options)
        elif split == "train":
            options = tuple(sorted({r.label for r in records if isinstance(r, Classification)}))
        else:  # validation prompts must list the same options as training ones
            options = load_stream_records(stream, data, "train").options
    origins = [where.get(id(r)) for r in records] if where else None
    return StreamRecords(name, stream.weight, records, stream, options, origins)
