"""Does a clearer espeak-ng voice make the asked colour or shape word audible? Whisper tiny.en's own decoder
(scripts/whisper_anchor.py) transcribes easy-VQA test questions that name a colour or a shape, spoken in
several voice settings, and the share whose transcript contains that word is printed per setting.

    python scripts/speech_voice_probe.py                 # 48 questions, seed 0; about 2 min on 1 core

The clips go to a temporary folder; nothing is cached. This measures the audio (can a speech model trained
for transcription hear the word at all), not metalm's speech preset (docs/speech.md, "What was tried").
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from whisper_anchor import transcribe

from metalm.data.builtin import EASY_VQA_COLORS, EASY_VQA_SHAPES
from metalm.data.speech import VARIANTS, VOICES, Voice, synthesize

# The words a question can ask about: easy-VQA's 8 colours and 3 shapes.
WORDS = (*EASY_VQA_COLORS, *EASY_VQA_SHAPES)
SETTINGS: dict[str, Callable[[random.Random], Voice]] = {
    "as generated: 6 accents x 5 variants, 140-190 wpm, pitch 30-70": lambda r: Voice(
        r.choice(VOICES) + r.choice(VARIANTS), r.randint(140, 190), r.randint(30, 70)
    ),
    "6 accents, no variant": lambda r: Voice(r.choice(VOICES), r.randint(140, 190), r.randint(30, 70)),
    "en-us / en-gb / en-gb-x-rp, no variant": lambda r: Voice(
        r.choice(("en-us", "en-gb", "en-gb-x-rp")), r.randint(140, 190), r.randint(30, 70)
    ),
    "as generated, slower (110-130 wpm)": lambda r: Voice(
        r.choice(VOICES) + r.choice(VARIANTS), r.randint(110, 130), r.randint(30, 70)
    ),
    "en-us only, 160 wpm, pitch 50": lambda r: Voice("en-us", 160, 50),
}


def asked_word(question: str) -> str | None:
    return next((w for w in WORDS if re.search(rf"\b{w}\b", question)), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from metalm.data.builtin import load_builtin

    questions = sorted({r.question for r in load_builtin("easy_vqa_vqa", "test") if asked_word(r.question)})
    random.Random(args.seed).shuffle(questions)
    questions = questions[: args.questions]
    print("| voice setting | asked word in Whisper tiny.en's transcript |\n|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, voice_of) in enumerate(SETTINGS.items()):
            rng = random.Random(args.seed + 1)
            paths = [Path(tmp) / f"{i}-{j}.flac" for j in range(len(questions))]
            for question, path in zip(questions, paths):
                synthesize(question, voice_of(rng), path)
            heard = transcribe([str(p) for p in paths])
            hits = sum(bool(re.search(rf"\b{asked_word(q)}\b", h.lower())) for q, h in zip(questions, heard))
            print(f"| {name} | {hits}/{len(questions)} ({100 * hits / len(questions):.0f} %) |", flush=True)


if __name__ == "__main__":
    main()
