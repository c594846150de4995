"""The transcript loss (`model.encoders[].transcript_loss`): a CTC loss that trains an audio encoder's slots to
say, as the decoder's word embeddings, what each training clip says."""

from __future__ import annotations

import pytest
import torch

from metalm import build_metalm
from metalm.data.records import AudioText, VQAExample
from metalm.data.segments import EncodedSegment
from metalm.modalities.audio import AudioInput
from metalm.training.config import ConfigError, config_from_dict
from metalm.training.data import DataStream, StreamRecords
from tests.test_audio import TINY_WHISPER, _recipe, soundfile, tone  # noqa: F401 (soundfile: skip without it)

SAMPLING_RATE = 16_000


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return build_metalm(_recipe(text=True))


def _ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_training_clips_carry_their_transcript_and_no_label(built, tmp_path):
    _, processor = built
    soundfile.write(tmp_path / "q.wav", tone(440, 0.5), SAMPLING_RATE)
    soundfile.write(tmp_path / "a.wav", tone(880, 0.8), SAMPLING_RATE)
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    records = [
        AudioText(str(tmp_path / "a.wav"), "the cat sat"),
        VQAExample(str(tmp_path / "red.png"), "is it red?", ("yes",), audio=str(tmp_path / "q.wav")),
    ]
    stream = DataStream([StreamRecords("speech", 1.0, records)], processor, seq_len=64, batch_size=1)
    seen = {}
    for _ in range(6):
        sample, _, sources = stream.next_sample()
        heard = [seg for seg in sample if isinstance(seg, EncodedSegment) and seg.encoder == "speech"][0]
        assert not heard.loss  # what the clip says is never a decoder label
        seen[sources[0]] = heard.target_ids
    assert seen == {0: _ids(processor, "the cat sat"), 1: _ids(processor, "is it red?")}


def _batch(processor, weight: float | None):
    prompts = [
        [AudioInput(tone(300, 0.6), transcript=_ids(processor, "low")), "pitch:", _target("low")],
        [AudioInput(tone(1200, 0.6)), "pitch:", _target("high")],  # no transcript: left out of the loss
        [AudioInput(tone(1200, 0.9), transcript=_ids(processor, "very high")), "pitch:", _target("high")],
    ]
    samples = [processor.build_sample(p, add_bos=True, add_eos=True) for p in prompts]
    return processor.collate(samples, transcripts={"speech": weight} if weight is not None else None)


def _target(text: str):
    from metalm import Target

    return Target(text)


def test_collate_lists_transcripts_in_payload_order_only_when_asked(built):
    _, processor = built
    assert "encoder_transcripts" not in _batch(processor, None)
    assert "encoder_transcripts" not in _batch(processor, 0.0)
    heard = _batch(processor, 0.5)["encoder_transcripts"]["speech"]
    low, very_high = _ids(processor, "low"), _ids(processor, "very high")
    assert heard["lengths"].tolist() == [len(low), 0, len(very_high)]
    assert heard["ids"][0, : len(low)].tolist() == low and heard["ids"][2].tolist() == very_high
    assert float(heard["weight"]) == 0.5


def test_the_loss_adds_the_weighted_ctc_of_the_slots_against_the_word_embeddings(built):
    model, processor = built
    model.eval()
    plain = _batch(processor, None)
    batch = _batch(processor, 0.5)
    with torch.no_grad():
        lm = model(**plain).loss
        out = model(**batch)
        # The same CTC computed by hand: slots scored against the decoder's word embeddings, blank = pad.
        payload = batch["encoder_inputs"]["speech"]
        projected, mask = model.encode_padded("speech", payload)
        words = model.decoder.get_input_embeddings().weight
        rows = [0, 2]
        log_probs = (projected[rows] @ words.T).log_softmax(-1).transpose(0, 1)
        heard = batch["encoder_transcripts"]["speech"]
        ctc = torch.nn.functional.ctc_loss(
            log_probs, heard["ids"][rows], mask[rows].sum(-1), heard["lengths"][rows],
            blank=processor.pad_token_id, zero_infinity=True,
        )  # fmt: skip
    assert torch.allclose(out.transcript_loss, 0.5 * ctc, rtol=1e-5)
    assert torch.allclose(out.loss, lm + 0.5 * ctc, rtol=1e-5)
    assert torch.equal(out.logits, model(**plain).logits)  # the decoder's own computation is unchanged


def test_training_on_it_makes_the_slots_spell_the_words(built):
    torch.manual_seed(0)
    model, processor = build_metalm(_recipe(text=True))
    whisper = model.encoders["speech"].backbone.whisper
    with torch.no_grad():  # a random Whisper's convolutions are drowned by its position table (test_audio)
        for conv in (whisper.conv1, whisper.conv2):
            torch.nn.init.normal_(conv.weight, std=0.3)
    words = {300: "low", 1200: "high"}
    prompts = [
        [AudioInput(tone(hz, 0.6), transcript=_ids(processor, w)), "pitch:"] for hz, w in words.items()
    ]
    samples = [processor.build_sample(p, add_bos=True) for p in prompts]
    batch = processor.collate(samples, transcripts={"speech": 1.0})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(60):
        _, loss = model.embed_inputs(
            batch["input_ids"], batch["encoder_inputs"], batch["encoder_slots"], batch["encoder_transcripts"]
        )
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < first / 4
    model.eval()
    with torch.no_grad():
        projected, mask = model.encode_padded("speech", batch["encoder_inputs"]["speech"])
        best = (projected @ model.decoder.get_input_embeddings().weight.T).argmax(-1)
    for row, word in enumerate(words.values()):
        path = [int(t) for t in best[row][mask[row]]]
        spelt = [
            t for i, t in enumerate(path) if t != processor.pad_token_id and (i == 0 or t != path[i - 1])
        ]
        assert processor.tokenizer.decode(spelt) == word


@pytest.mark.parametrize(
    ("encoder", "weight"), [({"name": "v", "kind": "vision", "source": "config"}, 0.5), (None, -1.0)]
)
def test_the_setting_takes_a_weight_on_an_audio_encoder(encoder, weight):
    speech = {"name": "speech", "kind": "audio", "source": "config", "config": dict(TINY_WHISPER)}
    spec = {**(encoder or speech), "transcript_loss": weight}
    if encoder is not None:
        spec["config"] = {"model_type": "vit"}
    raw = {
        "model": {"decoder": {"model_type": "llama"}, "encoders": [spec]},
        "data": {"streams": [{"source": "pydoc"}]},
    }
    with pytest.raises(ConfigError, match=r"transcript_loss: takes a weight >= 0, on an audio encoder"):
        config_from_dict(raw)


def test_a_training_run_logs_the_transcript_loss_on_its_own(tmp_path):
    import json

    from metalm.training.trainer import train
    from tests.training_helpers import tiny_config

    lines = []
    for i, (hz, text) in enumerate([(300, "a low tone"), (1200, "a high tone")] * 3):
        soundfile.write(tmp_path / f"{i}.wav", tone(hz, 0.6, seed=i), SAMPLING_RATE)
        lines.append(json.dumps({"kind": "audio_text", "audio": f"{i}.wav", "text": text}))
    (tmp_path / "speech.jsonl").write_text("\n".join(lines) + "\n")
    speech = {
        "name": "speech",
        "kind": "audio",
        "source": "config",
        "config": {**TINY_WHISPER, "frame_stack": 4, "max_seconds": 3},
        "connector": "mlp",
        "transcript_loss": 0.5,
    }
    raw = tiny_config(
        tmp_path / "run",
        data={"streams": [{"name": "heard", "source": str(tmp_path / "speech.jsonl")}], "max_records": None},
        optim={"max_steps": 3, "grad_accum": 1, "batch_size": 2},
        run={"eval_every": 0, "save_every": 0},
    )
    raw["model"]["encoders"] = [raw["model"]["encoders"][0], speech]
    train(config_from_dict(raw))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < r["transcript_loss"] < r["loss"] for r in rows)
    assert "transcript_loss" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]


def test_a_spoken_question_is_pulled_toward_its_typed_twin(tmp_path):
    import json

    from PIL import Image

    from metalm.training.data import build_data

    torch.manual_seed(0)
    model, processor = build_metalm(_recipe(text=True))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    lines = []
    for i, (hz, question, answer) in enumerate([(300, "is it red?", "yes"), (1200, "is it blue?", "no")]):
        soundfile.write(tmp_path / f"{i}.wav", tone(hz, 0.6), SAMPLING_RATE)
        lines.append(json.dumps({"kind": "vqa", "image": "red.png", "audio": f"{i}.wav", "question": question,
                                 "answers": [answer]}))  # fmt: skip
    (tmp_path / "spoken.jsonl").write_text("\n".join(lines) + "\n")
    from metalm.training.config import DataConfig

    stream = {"source": str(tmp_path / "spoken.jsonl"), "typed_twin": 2.0}
    data, _ = build_data(DataConfig(streams=[stream], seq_len=64), processor, batch_size=2, seed=0)
    batch = data.next_batch()
    with pytest.raises(ValueError, match="typed_twin takes the answer position per row"):
        build_data(DataConfig(streams=[stream], seq_len=64, pack=True), processor, batch_size=2, seed=0)
    twins = batch["typed_twins"]
    assert twins["rows"].tolist() == [0, 1] and twins["weights"].tolist() == [2.0, 2.0]
    typed = list(twins["batch"]["encoder_inputs"])  # the twin reads its question through the text encoder
    assert "text" in typed and "speech" not in typed
    model.train()
    out = model(**batch)
    plain = model(**{k: v for k, v in batch.items() if k != "typed_twins"})
    assert out.typed_twin_loss > 0
    assert torch.allclose(out.loss, plain.loss + out.typed_twin_loss, rtol=1e-5)
    out.loss.backward()  # the gradient reaches the speech connector through the student's states
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connectors["speech"].parameters())
