"""The prediction files' one name: written where the readers look, seeds in numeric order, one task's only."""

from metalm.evaluation.prediction_files import prediction_files, prediction_path, read_predictions


def test_files_come_back_by_k_then_numeric_seed_and_only_the_tasks_own(tmp_path):
    for k, seed in [(4, 10), (4, 2), (0, 0), (4, 0), (1, 1)]:
        prediction_path(tmp_path, "easyvqa", k, seed).write_text('{"id": "a"}\n')
    # Names a glob of "predictions-easyvqa-k*" would not tell apart by eye: another task, a stray file.
    prediction_path(tmp_path, "easyvqa-caption", 0, 0).write_text("{}\n")
    prediction_path(tmp_path, "fastbind-shape-2way-real", 1, 0).write_text("{}\n")
    (tmp_path / "predictions-easyvqa-k4-s3.jsonl.tmp").write_text("{}\n")

    names = [p.name for p in prediction_files(tmp_path, "easyvqa")]
    assert names == [
        "predictions-easyvqa-k0-s0.jsonl",
        "predictions-easyvqa-k1-s1.jsonl",
        "predictions-easyvqa-k4-s0.jsonl",
        "predictions-easyvqa-k4-s2.jsonl",
        "predictions-easyvqa-k4-s10.jsonl",  # after s2, not between s0 and s2 as a sorted glob puts it
    ]
    assert [p.name for p in prediction_files(tmp_path, "easyvqa", 4)] == names[2:]
    assert prediction_files(tmp_path, "easyvqa", 2) == []
    assert [p.name for p in prediction_files(tmp_path, "fastbind-shape-2way")] == []
    assert len(prediction_files(tmp_path, "fastbind-shape-2way-real")) == 1
    assert read_predictions(prediction_path(tmp_path, "easyvqa", 4, 10)) == [{"id": "a"}]
