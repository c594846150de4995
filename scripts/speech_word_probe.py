"""Where is the asked word lost? Two probes on spoken easy-VQA questions (docs/speech.md, "What was tried").

1. Whisper tiny.en's frozen frames: a logistic regression on each clip's mean- and max-pooled frames, trained on
   training clips, predicts the colour or shape word a held-out clip asks about (held-out voices). High accuracy
   means the word is in what the connector receives.
2. With ``--model``, a trained speech model's slots read out as CTC would (each slot's nearest decoder word
   embedding, repeats merged, pad = blank; `model.encoders[].transcript_loss` trains exactly this): the word
   error rate of those read-outs against the transcripts, and how often the asked word is right.

    python scripts/speech_word_probe.py                              # probe 1, ~3 min on 1 core
    python scripts/speech_word_probe.py --model runs/speech/final    # and probe 2
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from metalm.data.builtin import EASY_VQA_COLORS, EASY_VQA_SHAPES
from metalm.data.speech import load_speech

WORDS = (*EASY_VQA_COLORS, *EASY_VQA_SHAPES)


def asked_word(question: str) -> str | None:
    """The one colour or shape word a question names, or None."""
    hits = [w for w in WORDS if w in question.replace("?", " ").split()]
    return hits[0] if len(hits) == 1 else None


def records(split: str, limit: int, seed: int = 0) -> list[dict]:
    """`limit` random distinct clips of `speech_easy_vqa` `split` whose question names one word."""
    clips = {
        r.audio: {"audio": r.audio, "question": r.question} for r in load_speech("speech_easy_vqa", split)
    }
    rows = sorted((r for r in clips.values() if asked_word(r["question"])), key=lambda r: r["audio"])
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def pooled_frames(rows: list[dict]) -> np.ndarray:
    """Mean and max over time of Whisper tiny.en's final frames, one row per clip."""
    from transformers import WhisperFeatureExtractor

    from metalm.data.audio import load_audio
    from metalm.model.whisper import WhisperAudioEncoder, load_packaged_whisper_encoder

    encoder = WhisperAudioEncoder(load_packaged_whisper_encoder().config, frame_stack=1)
    encoder.whisper = load_packaged_whisper_encoder()
    extract = WhisperFeatureExtractor(feature_size=80)
    out = []
    for row in rows:
        samples = load_audio(row["audio"])
        mel = extract(samples, sampling_rate=16_000, return_tensors="pt", padding=False).input_features
        with torch.no_grad():
            frames = encoder.frames(mel)[0]
        out.append(torch.cat([frames.mean(0), frames.max(0).values]).numpy())
    return np.stack(out)


def frame_probe(train_n: int, test_n: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    train, test = records("train", train_n), records("test", test_n)
    classifier = LogisticRegression(max_iter=3000).fit(
        pooled_frames(train), [asked_word(r["question"]) for r in train]
    )
    predicted = classifier.predict(pooled_frames(test))
    gold = np.array([asked_word(r["question"]) for r in test])
    by_word = {w: float(np.mean(predicted[gold == w] == w)) for w in WORDS if (gold == w).any()}
    return {
        "accuracy": float(np.mean(predicted == gold)),
        "train": len(train),
        "test": len(test),
        "by_word": by_word,
    }


def slot_readout(model_dir: str, test_n: int) -> dict:
    """CTC read-out of the model's speech slots on distinct held-out clips: WER and asked-word accuracy."""
    import jiwer

    from metalm.evaluation.experiments import load_model
    from metalm.modalities.audio import AudioInput

    model, processor = load_model(Path(model_dir))
    name = model.config.encoders_of_kind("audio")[0]
    words = model.decoder.get_input_embeddings().weight
    blank, refs, hyps, right, samples = processor.pad_token_id, [], [], 0, []
    for row in records("test", test_n):
        batch = processor([[AudioInput(row["audio"])]], add_bos=False)
        with torch.no_grad():
            slots, mask = model.encode_padded(name, batch["encoder_inputs"][name])
            path = (slots[0][mask[0]] @ words.T).argmax(-1).tolist()
        spelt = [t for i, t in enumerate(path) if t != blank and (i == 0 or t != path[i - 1])]
        text = processor.decode(spelt)
        refs.append(row["question"].lower())
        hyps.append(text.lower())
        right += asked_word(text.lower()) == asked_word(row["question"])
        samples.append([row["question"], text])
    return {"wer": 100 * jiwer.wer(refs, hyps), "asked_word": 100 * right / len(refs), "n": len(refs),
            "samples": samples[:8]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1500, help="training clips for the frame probe")
    parser.add_argument("--test", type=int, default=400, help="held-out clips")
    parser.add_argument("--model", default=None, help="a trained speech model: read its slots out as CTC")
    parser.add_argument("--skip-frames", action="store_true", help="only the slot read-out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {}
    if not args.skip_frames:
        out["frames"] = frame_probe(args.train, args.test)
    if args.model:
        out["slots"] = slot_readout(args.model, args.test)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
