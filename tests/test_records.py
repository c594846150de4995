"""JSONL record format: round trips, kind inference, error locations, skip reports, streaming."""

from __future__ import annotations

import base64
import inspect
import io
import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from metalm.data.records import (
    Classification,
    ImagePart,
    ImageText,
    Interleaved,
    RecordError,
    SkipReport,
    TextDocument,
    TextPart,
    VQAExample,
    parse_record,
    read_jsonl,
    read_records,
    record_to_dict,
    validate_file,
    write_jsonl,
)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png_bytes())
    return tmp_path


def _write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines))
    return path


GOOD = '{"text": "hello"}'


def test_round_trip_all_kinds(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "b.png"
    outside.write_bytes(_png_bytes())
    inside = str(folder / "img" / "a.png")
    data_url = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()
    records = [
        TextDocument("a document", id="d1"),
        ImageText(inside, "a red square."),
        ImageText(str(outside), "elsewhere", id="7"),
        ImageText(data_url, "inline"),
        Interleaved((TextPart("look:"), ImagePart(inside), TextPart("nice"))),
        VQAExample(inside, "what colour?", ("red", "crimson"), id="q"),
        Classification("great movie", "positive"),
    ]
    path = folder / "out.jsonl"
    assert write_jsonl(records, path) == len(records)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows[1]["image"] == "img/a.png"  # under the file's folder: relative
    assert rows[2]["image"] == str(outside)  # elsewhere: absolute
    assert rows[3]["image"] == data_url  # inline: verbatim
    assert [r["kind"] for r in rows] == [
        "text",
        "image_text",
        "image_text",
        "image_text",
        "interleaved",
        "vqa",
        "classification",
    ]
    assert list(read_jsonl(path)) == records
    assert not (folder / "out.jsonl.tmp").exists()


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"text": "t"}, TextDocument),
        ({"image": "img/a.png", "text": "t"}, ImageText),
        ({"content": [{"type": "text", "text": "t"}]}, Interleaved),
        ({"image": "img/a.png", "question": "q?", "answers": ["a"]}, VQAExample),
        ({"image": "img/a.png", "question": "q?", "answer": "a", "id": 3}, VQAExample),
        ({"text": "t", "label": "l", "meta": {"x": [1, 2]}}, Classification),
    ],
)
def test_kind_inference(folder: Path, obj: dict, expected: type) -> None:
    record = parse_record(obj, base_dir=folder)
    assert type(record) is expected
    assert parse_record(record_to_dict(record, base_dir=folder), base_dir=folder) == record


def test_answer_and_id_normalised(folder: Path) -> None:
    r = parse_record(
        {"kind": "vqa", "image": "img/a.png", "question": "q?", "answer": "yes", "id": 12}, base_dir=folder
    )
    assert r == VQAExample(str(folder / "img" / "a.png"), "q?", ("yes",), id="12")


DEEP = '{"text": "a", "meta": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"

BAD_CASES = [
    ('{"text": "a"', None),  # invalid JSON
    ("[1, 2]", None),  # not an object
    ('"just a string"', None),
    ('{"text": "   "}', "text"),
    ('{"text": 5}', "text"),
    ('{"text": "a", "foo": 1}', "foo"),
    ('{"kind": "text", "text": "a", "image": "img/a.png"}', "image"),
    ('{"kind": "audio", "text": "a"}', "kind"),
    ('{"kind": 3, "text": "a"}', "kind"),
    ('{"image": "img/a.png"}', "kind"),  # cannot infer
    ('{"image": "missing.png", "text": "a"}', "image"),
    ('{"image": "img", "text": "a"}', "image"),  # a folder, not a file
    ('{"image": "data:image/png;base64,@@@@", "text": "a"}', "image"),
    ('{"image": "data:text/plain;base64,aGk=", "text": "a"}', "image"),
    ('{"image": "data:image/png,rawbytes", "text": "a"}', "image"),
    ('{"image": "https://example.com/a.png", "text": "a"}', "image"),
    ('{"image": 7, "text": "a"}', "image"),
    ('{"text": "a", "text": "b"}', "text"),  # duplicate key
    (DEEP, None),
    ('{"text": "\\ud800"}', "text"),  # lone surrogate
    ('{"text": "a", "id": true}', "id"),
    ('{"text": "a", "meta": []}', "meta"),
    ('{"kind": "classification", "text": "a"}', "label"),
    ('{"kind": "vqa", "image": "img/a.png", "question": "q"}', "answers"),
    ('{"kind": "vqa", "image": "img/a.png", "question": "q", "answers": []}', "answers"),
    ('{"kind": "vqa", "image": "img/a.png", "question": "q", "answers": ["a", 2]}', "answers[1]"),
    ('{"kind": "vqa", "image": "img/a.png", "question": "q", "answers": ["a"], "answer": "a"}', "answer"),
    ('{"content": []}', "content"),
    ('{"content": [{"type": "text", "text": "a"}, {"type": "video"}]}', "content[1].type"),
    ('{"content": [{"type": "image", "image": "missing.png"}]}', "content[0].image"),
    ('{"content": [{"type": "text", "text": "a", "image": "img/a.png"}]}', "content[0].image"),
    ('{"content": ["text"]}', "content[0]"),
    # Over Python's int-string conversion limit: json.loads raises a bare ValueError on these.
    ('{"text": "a", "id": ' + "9" * 5000 + "}", "id"),
    (
        '{"kind": "vqa", "image": "img/a.png", "question": "q", "answers": ["a", -' + "1" * 5000 + "]}",
        "answers",
    ),
    ("9" * 5000, None),
]


@pytest.mark.parametrize(("line", "field"), BAD_CASES)
def test_bad_record_names_line_and_field(folder: Path, line: str, field: str | None) -> None:
    path = _write_lines(folder / "data.jsonl", [GOOD, "", line, GOOD])  # bad one is line 3
    with pytest.raises(RecordError) as info:
        list(read_jsonl(path))
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:3: ")
    assert str(err).endswith("— fix the record or pass --skip-bad to skip it")


def test_validate_cli_counts_a_5000_digit_integer(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from metalm.cli import main

    path = _write_lines(folder / "d.jsonl", [GOOD, '{"text": "a", "id": ' + "7" * 5000 + "}", GOOD])
    assert main(["data", "validate", "--skip-bad", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}: 2 good records, 1 bad" in out
    assert f"{path}:2: field 'id': integer of 5000 digits is too long" in err and "Traceback" not in err
    assert main(["data", "validate", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:2: field 'id': integer of 5000 digits") and "\n" not in err


def test_error_message_format(folder: Path) -> None:
    path = _write_lines(folder / "train.jsonl", [GOOD, '{"text": ""}'])
    with pytest.raises(RecordError) as info:
        list(read_jsonl(path))
    assert (
        str(info.value)
        == f"{path}:2: field 'text': empty string — fix the record or pass --skip-bad to skip it"
    )
    assert info.value.reason == "empty string"
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.path, again.line, again.field, str(again)) == (str(path), 2, "text", str(info.value))


def test_non_utf8_line(folder: Path) -> None:
    path = _write_lines(folder / "d.jsonl", [GOOD, b'{"text": "caf\xe9"}', GOOD])
    with pytest.raises(RecordError) as info:
        list(read_jsonl(path))
    assert info.value.line == 2 and info.value.field is None
    assert "UTF-8" in str(info.value) and "0xe9" in str(info.value)


def test_bom_tolerated(folder: Path) -> None:
    path = folder / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    assert list(read_jsonl(path)) == [TextDocument("hello")] * 2


def test_skip_bad_counts_and_lists(folder: Path) -> None:
    lines = [GOOD, '{"text": ""}', "not json", GOOD, '{"text": "x", "oops": 1}', GOOD]
    path = _write_lines(folder / "d.jsonl", lines)
    report = SkipReport()
    good = list(read_jsonl(path, skip_bad=True, report=report))
    assert len(good) == 3
    assert report.count == 3
    assert [(line, fld) for _, line, fld, _ in report.items] == [(2, "text"), (3, None), (5, "oops")]
    summary = report.summary()
    assert summary.startswith("skipped 3 bad records:") and f"{path}:5: field 'oops'" in summary
    assert validate_file(path, skip_bad=True)[0] == 3
    with pytest.raises(RecordError):
        validate_file(path)


def test_skip_report_caps_items_but_counts_all(folder: Path) -> None:
    path = _write_lines(folder / "d.jsonl", ["{bad"] * 30)
    report = SkipReport(max_items=5)
    assert list(read_jsonl(path, skip_bad=True, report=report)) == []
    assert report.count == 30 and len(report.items) == 5
    assert "... and 25 more" in report.summary(limit=5)


def test_skip_bad_without_report_warns(folder: Path) -> None:
    path = _write_lines(folder / "d.jsonl", [GOOD, "{bad"])
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        assert len(list(read_jsonl(path, skip_bad=True))) == 1


def test_reader_streams_lazily(folder: Path) -> None:
    path = _write_lines(folder / "d.jsonl", [GOOD, '{"text": "second"}', "{broken"])
    it = read_jsonl(path)
    assert inspect.isgenerator(it)
    # Records before a bad line arrive before the bad line is even read.
    assert next(it) == TextDocument("hello")
    assert next(it) == TextDocument("second")
    with pytest.raises(RecordError):
        next(it)
    # Nothing is opened until iteration starts.
    lazy = read_jsonl(folder / "does-not-exist.jsonl")
    with pytest.raises(FileNotFoundError):
        next(lazy)


def test_oversize_line(folder: Path) -> None:
    path = _write_lines(folder / "d.jsonl", [GOOD, '{"text": "' + "x" * 500 + '"}', GOOD])
    report = SkipReport()
    assert len(list(read_jsonl(path, skip_bad=True, report=report, max_line_bytes=100))) == 2
    assert report.items[0][1] == 2 and "longer than" in report.items[0][3]


def test_absolute_image_path_and_data_url(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("abs") / "z.png"
    other.write_bytes(_png_bytes())
    url = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()
    lines = [json.dumps({"image": str(other), "text": "a"}), json.dumps({"image": url, "text": "b"})]
    recs = list(read_jsonl(_write_lines(folder / "d.jsonl", lines)))
    assert recs[0].image == str(other) and recs[1].image == url


def test_check_images(folder: Path) -> None:
    pytest.importorskip("metalm.data.images")
    (folder / "img" / "broken.png").write_bytes(b"this is not a png")
    lines = ['{"image": "img/a.png", "text": "ok"}', '{"image": "img/broken.png", "text": "bad"}']
    path = _write_lines(folder / "d.jsonl", lines)
    assert len(list(read_jsonl(path))) == 2  # existence only, by default
    with pytest.raises(RecordError) as info:
        list(read_jsonl(path, check_images=True))
    assert (info.value.line, info.value.field) == (2, "image")
    n_ok, report = validate_file(path, skip_bad=True, check_images=True)
    assert (n_ok, report.count) == (1, 1)


def test_read_records_folder(folder: Path) -> None:
    data = folder / "data"
    data.mkdir()
    _write_lines(data / "b.jsonl", ['{"text": "from b"}'])
    _write_lines(data / "a.jsonl", ['{"text": "from a"}', ""])
    (data / "notes.txt").write_text("ignored")
    assert [r.text for r in read_records(data)] == ["from a", "from b"]
    assert [r.text for r in read_records(data / "b.jsonl")] == ["from b"]
    (folder / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        list(read_records(folder / "empty"))
    with pytest.raises(FileNotFoundError):
        list(read_records(folder / "nope"))


def test_hf_datasets_folder(folder: Path) -> None:
    try:
        import datasets
    except ImportError:
        hf = folder / "hf"
        hf.mkdir()
        (hf / "dataset_info.json").write_text("{}")
        with pytest.raises(ValueError, match="datasets"):
            list(read_records(hf))
        return
    rows = [
        {"kind": "text", "text": "hello", "image": None},
        {"kind": "image_text", "text": "cap", "image": "../img/a.png"},
        {"kind": "text", "text": " ", "image": None},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "hf"))
    report = SkipReport()
    got = list(read_records(folder / "hf", skip_bad=True, report=report))
    assert got == [TextDocument("hello"), ImageText(str(folder / "img" / "a.png"), "cap")]
    assert report.items == [(f"{folder / 'hf'}[row 2]", None, "text", "empty string")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(folder / "dd"))
    with pytest.raises(ValueError, match="one split"):
        list(read_records(folder / "dd"))
