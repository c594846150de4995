"""Finetuning recipes: instruction samples (FLAN style), the frozen-decoder protocol, LoRA, the presets."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from metalm.data.records import Classification, ImageText, VQAExample
from metalm.data.segments import EncodedSegment, TextSegment
from metalm.modalities.text import TEXT
from metalm.training.config import ConfigError, config_from_dict, load_config
from metalm.training.data import DataStream, StreamRecords
from tests.conftest import TINY_LLAMA, TINY_MODEL

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")
ARTICLE = " ".join(f"word{i}" for i in range(200))  # longer than the tiny text encoder takes (62 tokens)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def stream(records, processor, seq_len=96, **settings) -> DataStream:
    from metalm.training.config import StreamConfig

    cfg = StreamConfig(source="x", format=settings.pop("format", "instruction"), **settings)
    options = TOPICS if any(isinstance(r, Classification) for r in records) else None
    spec = StreamRecords("s", 1.0, list(records), cfg, tuple(cfg.options or ()) or options)
    return DataStream([spec], processor, seq_len=seq_len, batch_size=1)


def layout(sample) -> list[tuple[str, bool]]:
    return [("enc:" + s.encoder if isinstance(s, EncodedSegment) else "text", s.loss) for s in sample]


# --------------------------------------------------------------------------------------------
# Instruction samples


def test_classification_instruction_sample(tiny):
    _, p = tiny
    rec = Classification(text=ARTICLE, label="sports")
    data = stream([rec], p, template="{text} OPTIONS: {options} TARGET:", prompt="answer:")
    sample, _, _ = data.next_sample()
    assert layout(sample) == [("text", False), ("enc:text", False), ("text", False), ("text", True)]
    enc = p.decode(sample[1].target_ids)
    # The input is cut (word by word) to the encoder's span limit; the options stay written in.
    assert enc.startswith("word0 word1") and enc.endswith(
        "options: business, entertainment, politics, sports, tech target:"
    )
    assert len(sample[1].input_ids) <= TEXT.span_limit(p.config.encoder_spec("text")) and "word199" not in enc
    assert p.decode(sample[2].ids) == "answer:"
    assert sample[3].ids[-1] == p.eos_token_id and p.decode(sample[3].ids) == "sports"
    assert data.stats["inputs_truncated"] == 1
    # Labels: only the label and EOS are trained.
    batch = p.collate([sample])
    trained = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert trained == sample[3].ids

    # A short input is not cut; the default template writes the options in, with no decoder prompt.
    data = stream([Classification(text="Shares rose.", label="business")], p)
    sample, _, _ = data.next_sample()
    assert layout(sample) == [("text", False), ("enc:text", False), ("text", True)]
    assert p.decode(sample[1].target_ids) == (
        "shares rose. options: business, entertainment, politics, sports, tech target:"
    )
    assert data.stats.get("inputs_truncated", 0) == 0


def test_input_is_cut_to_fit_seq_len(tiny):
    _, p = tiny
    data = stream([Classification(text=ARTICLE, label="tech")], p, seq_len=20, template="{text}")
    sample, _, _ = data.next_sample()
    assert sum(len(s.ids) if isinstance(s, TextSegment) else len(s.input_ids) for s in sample) <= 20
    assert sample[-1].loss and p.decode(sample[-1].ids) == "tech"


def test_vqa_and_caption_templates(tiny):
    from metalm.data.builtin import load_builtin

    _, p = tiny
    vqa = load_builtin("easy_vqa_vqa", "validation")[0]
    sample, _, _ = stream([vqa], p, format="lm", template="Q: {question}", prompt="A:").next_sample()
    assert layout(sample) == [("text", False), ("enc:vision", True), ("enc:text", False)] + [
        ("text", False),
        ("text", True),
    ]
    assert p.decode(sample[2].target_ids) == "q: " + vqa.question.lower()
    assert p.decode(sample[3].ids) == "a:" and p.decode(sample[4].ids) == vqa.answers[0]
    cap = load_builtin("easy_vqa_captions", "validation")[0]
    data = stream([cap] * 4, p, template=["Summarize this image:", "Describe it."])
    seen = set()
    for _ in range(8):  # a template drawn per sample
        sample, _, _ = data.next_sample()
        assert layout(sample) == [("text", False), ("enc:vision", True), ("enc:text", False), ("text", True)]
        seen.add(p.decode(sample[2].target_ids))
        assert p.decode(sample[3].ids) == cap.text
    assert seen == {"summarize this image:", "describe it."}


def test_baseline_puts_the_input_in_untrained_text():
    from metalm import ModelRecipe

    _, p = ModelRecipe(decoder=TINY_LLAMA, tokenizer="packaged:minilm-l6").build()
    records = [
        Classification(text="Shares rose.", label="business"),
        VQAExample(image="unused.png", question="what shape?", answers=("circle",)),
        ImageText(image="unused.png", text="a red circle."),
    ]
    data = stream(records, p, template=None)
    texts = set()
    for _ in range(3):
        sample, _, _ = data.next_sample()
        assert all(isinstance(s, TextSegment) for s in sample)  # no encoders: no image, input as text
        assert [s.loss for s in sample][-1] is True and not any(s.loss for s in sample[:-1])
        texts.add(" | ".join(p.decode(s.ids) for s in sample[1:]))
    assert texts == {
        "shares rose. options: business, entertainment, politics, sports, tech target: | business",
        "question: what shape? | answer: | circle",
        "summarize this image: | a red circle.",
    }


def test_training_layout_matches_evaluation_prompts(tiny):
    """The instruction sample of a training template is the prompt the evaluation task builds + the label."""
    from metalm.evaluation.icl import build_prompt, prompt_to_sample
    from metalm.evaluation.tasks import Example, get_task

    _, p = tiny
    ex = Example(id="1", fields={"text": "Shares rose.", "options": ", ".join(TOPICS)}, answers=("business",))
    for task_name, template, prompt in (
        ("bbc-topic", "{text}", "topic:"),
        ("bbc-topic-options", "{text} OPTIONS: {options} TARGET:", None),
    ):
        task = get_task(task_name)
        expected = prompt_to_sample(p, build_prompt(task, ex))
        rec = Classification(text="Shares rose.", label="business")
        sample, _, _ = stream([rec], p, template=template, prompt=prompt).next_sample()
        assert sample[:-1] == expected, task_name
        assert sample[-1].ids == p.tokenize(task.render_target("business")) + [p.eos_token_id]


# --------------------------------------------------------------------------------------------
# Config validation and presets


@pytest.mark.parametrize(
    ("stream_cfg", "message"),
    [
        ({"template": "{text} {opts}"}, r"data.streams\[0\].template: .*unknown placeholder \{opts\}"),
        ({"template": "{text"}, r"data.streams\[0\].template: invalid template"),
        ({"template": "OPTIONS: {options}"}, r"must contain \{text\}"),
        ({"template": ["{text}", "{question}"]}, r"data.streams\[0\].template\[1\]: .*\{question\}"),
        (
            {"format": "lm", "template": "{text}"},
            r"data.streams\[0\].template: applies to format: instruction",
        ),
        ({"options": []}, r"data.streams\[0\].options: must be a non-empty list"),
        ({"format": "chat"}, r"data.streams\[0\].format: expected one of 'lm', 'instruction'"),
    ],
)
def test_bad_instruction_settings_name_the_key(tmp_path, stream_cfg, message):
    cfg = {
        "model": copy.deepcopy(TINY_MODEL),
        "data": {"streams": [{"source": "bbc_news", "format": "instruction", **stream_cfg}]},
    }
    with pytest.raises(ConfigError, match=message):
        config_from_dict(cfg)
    text = {"streams": [{"source": "bbc_news_text", "format": "instruction"}]}
    with pytest.raises(ConfigError, match=r"data.streams\[0\].format: .*records are 'text'"):
        config_from_dict({"model": copy.deepcopy(TINY_MODEL), "data": text})


def test_lora_settings_are_validated():
    base = {"init_from": "x", "data": {"streams": [{"source": "pydoc"}]}}
    with pytest.raises(ConfigError, match="model.decoder_trainable: cannot be true with model.lora"):
        config_from_dict({**base, "model": {"lora": {"r": 4}, "decoder_trainable": True}})
    with pytest.raises(ConfigError, match="model.lora.r: must be > 0"):
        config_from_dict({**base, "model": {"lora": {"r": 0}}})
    with pytest.raises(ConfigError, match="model.lora.rank: unknown key"):
        config_from_dict({**base, "model": {"lora": {"rank": 4}}})


@pytest.mark.parametrize(
    "name",
    [
        "finetune-frozen-decoder.yaml",
        "finetune-frozen-decoder-vqa.yaml",
        "finetune-full.yaml",
        "finetune-multitask.yaml",
        "instruct-heldout.yaml",
        "finetune-lora.yaml",
    ],
)
def test_finetune_presets_load(name):
    from metalm.evaluation.tasks import BUILTIN_TASKS

    cfg = load_config(CONFIGS / name)
    assert cfg.init_from == "runs/quickstart/final" and cfg.model.decoder is None
    streams = {s.name: s for s in cfg.data.streams}
    text = (CONFIGS / name).read_text()
    # The eval commands written in the preset name tasks that exist.
    for line in text.splitlines():
        if "metalm eval" in line:
            for task in line.split("--task")[1:]:
                assert task.split()[0] in BUILTIN_TASKS, line
    if name == "finetune-multitask.yaml":
        assert set(streams) == {"bbc_topic", "vqa", "caption"}
        assert all(s.format == "instruction" for s in streams.values()) and cfg.data.max_records == 30000
    if name == "instruct-heldout.yaml":
        assert set(streams) == {"vqa", "caption"} and "--task bbc-topic " in text  # BBC held out
        assert all(isinstance(s.template, list) and len(s.template) == 5 for s in streams.values())
    if name in ("finetune-frozen-decoder.yaml", "finetune-lora.yaml"):
        assert cfg.model.decoder_trainable is False and cfg.optim.lr in (5e-5, 2e-4)
        assert cfg.optim.batch_size == 32 and streams["bbc_topic"].prompt == "topic:"
    if name == "finetune-lora.yaml":
        assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
        ]
    if name == "finetune-full.yaml":
        assert cfg.model.decoder_trainable is True


# --------------------------------------------------------------------------------------------
# Runs (tiny model, a few steps)


@pytest.fixture(scope="module")
def saved_text_tiny(tmp_path_factory):
    """A tiny MetaLM with a text encoder only: on BBC articles every trainable parameter gets a gradient."""
    from metalm import EncoderRecipe, ModelRecipe
    from tests.conftest import TINY_BERT

    torch.manual_seed(4)
    model, processor = ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[EncoderRecipe("text", "text", source="config", tokenizer="decoder", config=TINY_BERT)],
    ).build()
    folder = tmp_path_factory.mktemp("init_text") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def finetune_config(init: Path, out: Path, **model) -> dict:
    return {
        "init_from": str(init),
        "model": model,
        "data": {
            "streams": [
                {"name": "bbc", "source": "bbc_news", "format": "instruction", "template": "{text}",
                 "prompt": "topic:"},
            ],  # fmt: skip
            "seq_len": 40,
            "max_records": 24,
        },
        "optim": {"lr": 5e-3, "warmup_steps": 0, "max_steps": 3, "batch_size": 2},
        "run": {"output_dir": str(out), "log_every": 1, "eval_every": 0, "eval_batches": 1, "save_every": 0,
                "tensorboard": False},
    }  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_frozen_decoder_run_changes_only_encoders_and_connectors(tiny_saved, tmp_path):
    from metalm.training.trainer import train

    result = train(config_from_dict(finetune_config(tiny_saved, tmp_path / "run", decoder_trainable=False)))
    before, after = weights(tiny_saved), weights(result.final_dir)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith("decoder.") for k in changed)
    assert any(k.startswith("connectors.text.") for k in changed)
    assert json.loads((result.final_dir / "config.json").read_text())["decoder_trainable"] is False
    assert "instruction inputs: " in (tmp_path / "run" / "train.log").read_text()  # articles were cut


def test_lora_trains_adapters_merges_and_resumes(saved_text_tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from metalm.data.processor import MetaLMProcessor
    from metalm.training.trainer import Trainer, train

    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    cfg = finetune_config(saved_text_tiny, tmp_path / "full", lora=lora)
    cfg["optim"]["max_steps"] = 4
    cfg["run"]["save_every"] = 2
    trainer = Trainer(config_from_dict(cfg))
    result = trainer.train()

    # Mid-run checkpoints keep the adapters; the decoder's own weights never moved.
    ckpt = weights(tmp_path / "full" / "checkpoint-2" / "model")
    before = weights(saved_text_tiny)
    adapters = [k for k in ckpt if ".lora_" in k]
    assert adapters and all(("q_proj" in k or "v_proj" in k) for k in adapters)
    for k, v in ckpt.items():
        if k.startswith("decoder.") and ".lora_" not in k:
            assert torch.equal(v, before[k.replace(".base_layer.", ".")]), k
    # final/ is merged: plain keys, only the adapted projections (and encoders/connectors) changed.
    after = weights(result.final_dir)
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    decoder_changed = {k for k in changed if k.startswith("decoder.")}
    assert decoder_changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in decoder_changed)
    assert any(k.startswith("connectors.") for k in changed)
    # ... and reloads with plain from_pretrained, giving the merged in-memory model's logits exactly.
    merged = trainer._unwrapped().eval()
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    processor = MetaLMProcessor.from_pretrained(result.final_dir)
    from metalm import Encode

    batch = processor([[Encode("Shares rose sharply."), "topic:"]])
    with torch.no_grad():
        assert torch.equal(merged(**batch).logits, reloaded(**batch).logits)

    # Resume: a run interrupted in step 3 continues from checkpoint-2 (adapters, optimizer state, RNG for
    # the adapter dropout) with the uninterrupted run's losses.
    from metalm.training import data as data_module

    cfg["run"]["output_dir"] = str(tmp_path / "resumed")
    real, calls = data_module.DataStream.next_batch, {"n": 0}

    def interrupted(self):
        calls["n"] += self.split == "train"
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(data_module.DataStream, "next_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(cfg))
    monkeypatch.setattr(data_module.DataStream, "next_batch", real)
    resumed = train(config_from_dict(cfg))
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "checkpoint-2"
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(result.losses[step], abs=1e-6)
    key = "decoder.model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(weights(resumed.final_dir)[key], after[key], atol=1e-6)


def test_finetune_my_data_config_extends_a_preset(tmp_path, caplog):
    """`extends` a from-scratch preset + `init_from`: the preset's settings are kept, its architecture is
    not (the saved model fixes it); setting an architecture key in the file itself stays an error."""
    (tmp_path / "train.jsonl").write_text('{"kind": "text", "text": "hello"}\n')
    (tmp_path / "mine.yaml").write_text(
        f"extends: {CONFIGS / 'quickstart.yaml'}\n"
        "init_from: runs/quickstart/final\n"
        f"data:\n  streams:\n    - {{name: mine, source: {tmp_path / 'train.jsonl'}}}\n"
        "run: {output_dir: runs/mine}\n"
    )
    cfg = load_config(tmp_path / "mine.yaml")
    base = load_config(CONFIGS / "quickstart.yaml")
    assert cfg.model.decoder is None and cfg.model.encoders is None and cfg.model.tokenizer is None
    assert cfg.optim == base.optim and cfg.data.seq_len == base.data.seq_len
    assert [s.name for s in cfg.data.streams] == ["mine"] and cfg.run.output_dir == "runs/mine"
    assert load_config(tmp_path / "mine.yaml", ["model.encoders=null"]).model.encoders is None
    # Encoders named in the file itself are added to the saved model's (tests/test_dock_encoders.py).
    assert load_config(tmp_path / "mine.yaml", ["model.encoders=[]"]).model.encoders == []
    with pytest.raises(ConfigError, match="model.decoder: cannot be set together with init_from"):
        load_config(tmp_path / "mine.yaml", ["model.decoder=gpt2"])


def test_init_from_logs_what_it_loaded(tiny_saved, tmp_path, caplog):
    import logging

    from metalm.training.trainer import train

    cfg = finetune_config(tiny_saved, tmp_path / "run", decoder_trainable=False)
    cfg["optim"]["max_steps"] = 1
    with caplog.at_level(logging.INFO, logger="metalm.training"):
        train(config_from_dict(cfg))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("init_from"))
    assert str(tiny_saved) in line and "decoder llama" in line and "frozen" in line and "text (text" in line


def test_trainable_layers_override_the_saved_encoders(saved_text_tiny, tmp_path):
    """A model pre-trained with its encoder frozen is finetuned with the encoder's top layer training:
    `model.trainable_layers` replaces the saved setting, and the saved finetuned model records it."""
    from metalm.training.trainer import train

    cfg = finetune_config(
        saved_text_tiny, tmp_path / "run", decoder_trainable=False, trainable_layers={"text": 1}
    )
    result = train(config_from_dict(cfg))
    before, after = weights(saved_text_tiny), weights(result.final_dir)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    encoder = {k for k in changed if k.startswith("encoders.text.")}
    last = max(int(k.split(".layer.")[1].split(".")[0]) for k in before if ".layer." in k)
    assert encoder and all(f".layer.{last}." in k for k in encoder), sorted(encoder)  # the top layer only
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert saved["encoders"][0]["trainable_layers"] == 1

    cfg = finetune_config(saved_text_tiny, tmp_path / "bad", trainable_layers={"vision": 2})
    with pytest.raises(
        ConfigError, match=r"model.trainable_layers.vision: .* no encoder 'vision' \(it has: text\)"
    ):
        train(config_from_dict(cfg))
    with pytest.raises(ConfigError, match="model.trainable_layers: overrides a saved model's encoders"):
        config_from_dict(
            {**cfg, "init_from": None, "model": {"decoder": TINY_LLAMA, "trainable_layers": {"text": 1}}}
        )
