"""The frozen-feature cache (metalm.model.feature_cache): the frozen lower part of an encoder runs in eval
mode without gradients, and serving it from the cache changes no loss and no gradient."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from metalm import Encode, EncoderRecipe, ModelRecipe, Target
from metalm.data.images import ImagePreprocessor
from metalm.model.feature_cache import FeatureCache
from tests.conftest import TINY_BERT, TINY_LLAMA, TINY_MODEL, TINY_VIT

# (text trainable_layers, vision encoder, vision trainable_layers): split by layer, and fully frozen.
PARTIAL = (1, "efficientnet", 2)
FROZEN = (0, "vit", 0)


def build(text_layers: int, vision: str, vision_layers: int, seed: int = 0):
    vision_recipe = (
        EncoderRecipe(
            "vision",
            "vision",
            source="config",
            config={"model_type": "efficientnet_lite0"},
            image_size=64,  # 2 x 2 outputs (a random EfficientNet measures its slots in train mode)
            connector="mlp",
            trainable_layers=vision_layers,
        )
        if vision == "efficientnet"
        else EncoderRecipe(
            "vision",
            "vision",
            config=TINY_VIT,
            image_size=32,
            connector="mlp",
            trainable_layers=vision_layers,
        )
    )
    torch.manual_seed(seed)
    text = EncoderRecipe(
        "text", "text", source="config", tokenizer="decoder", config=TINY_BERT, trainable_layers=text_layers
    )
    return ModelRecipe(
        decoder=TINY_LLAMA, tokenizer="packaged:minilm-l6", encoders=[text, vision_recipe]
    ).build()


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


def batch_of(processor):
    # Row 3 repeats row 1's image and question: one computation serves both.
    prompts = [
        [image(1), Encode("what colour is the shape?", loss=True), Target("blue")],
        [image(2), Encode("what shape?"), Target("a green square")],
        [image(1), Encode("what colour is the shape?"), Target("blue")],
    ]
    return processor(prompts, padding_side="right")


def loss_and_grads(model, batch, seed: int = 3) -> tuple[float, dict[str, torch.Tensor]]:
    """One training forward/backward (dropout drawn from `seed`)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("setting", [PARTIAL, FROZEN], ids=["partly-frozen", "fully-frozen"])
def test_cached_equals_uncached_loss_and_gradients(setting, tmp_path):
    model, processor = build(*setting)
    model.train()
    batch = batch_of(processor)
    loss, grads = loss_and_grads(model, batch)
    cache = FeatureCache(tmp_path)
    assert cache.attach(model) == ["text", "vision"]
    for expected_hits in (0, 4):  # a cold pass (computed and stored), then served from memory
        cached_loss, cached_grads = loss_and_grads(model, batch)
        assert cache.stats.memory_hits == expected_hits
        assert cached_loss == pytest.approx(loss, abs=1e-6)
        assert cached_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(cached_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # 3 rows per encoder, of which 2 distinct: 2 computed each, then 2 served each.
    assert cache.stats.misses == 4
    # The trainable upper layers still learn; the frozen lower ones get no gradient.
    assert any(n.startswith("encoders.text.backbone.encoder.layer") for n in grads) == (setting[0] > 0)
    assert not any(n.startswith("encoders.text.backbone.embeddings") for n in grads)


@pytest.mark.parametrize("setting", [PARTIAL, FROZEN], ids=["partly-frozen", "fully-frozen"])
def test_split_encoder_matches_the_whole_backbone(setting):
    model, processor = build(*setting)
    model.eval()
    payloads = batch_of(processor)["encoder_inputs"]
    with torch.no_grad():
        text = model.encoders["text"]
        whole = text.backbone(**{k: payloads["text"][k] for k in ("input_ids", "attention_mask")})
        real = payloads["text"]["slot_mask"]
        torch.testing.assert_close(text(payloads["text"])[0][real], whole.last_hidden_state[real])
        vision = model.encoders["vision"]
        split, mask = vision(payloads["vision"])
        assert vision.lower_modules() is not None
        torch.testing.assert_close(
            split[mask], vision.modality.encode(vision.backbone, vision.spec, payloads["vision"])[0][mask]
        )


def test_a_second_epoch_hits_the_cache_from_memory_then_disk(tmp_path):
    model, processor = build(*PARTIAL)
    model.eval()
    batch = batch_of(processor)
    cache = FeatureCache(tmp_path)
    cache.attach(model)
    with torch.no_grad():
        first = model(**batch).logits
        model(**batch)
    assert (cache.stats.misses, cache.stats.memory_hits, cache.stats.disk_hits) == (4, 4, 0)
    entries = sorted(tmp_path.rglob("*.safetensors"))
    assert len(entries) == 4 and not list(tmp_path.rglob("*.tmp"))
    fresh = FeatureCache(tmp_path)  # a new process: nothing in memory
    fresh.attach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, first)
    assert (fresh.stats.misses, fresh.stats.disk_hits, fresh.stats.hit_rate) == (0, 4, 1.0)


def test_a_frozen_weight_or_preprocessing_change_changes_the_fingerprint(tmp_path):
    model, processor = build(*PARTIAL)
    model.eval()
    batch = batch_of(processor)
    cache = FeatureCache(tmp_path)
    cache.attach(model)
    vision = model.encoders["vision"]
    before = cache.fingerprint(vision)
    # A trainable (upper) layer changing does not touch the frozen part's outputs.
    with torch.no_grad():
        vision.backbone.layers[-1].conv.weight.add_(0.01)
    assert cache.fingerprint(vision) == before
    with torch.no_grad():
        model(**batch)
        vision.backbone.layers[0].conv.weight.add_(0.01)  # a frozen one does
        assert cache.fingerprint(vision) != before
        misses = cache.stats.misses
        model(**batch)
    assert cache.stats.misses == misses + 2  # the images are recomputed, the text spans are not
    # The preprocessor's settings are part of the fingerprint too.
    plain = FeatureCache(tmp_path, preprocessors={"vision": ImagePreprocessor(size=64)})
    other = FeatureCache(tmp_path, preprocessors={"vision": ImagePreprocessor(size=64, mean=(0.4,) * 3)})
    assert plain.fingerprint(vision) != other.fingerprint(vision)
    # So is the split point.
    split = cache.fingerprint(vision)
    model.config.encoders[1]["trainable_layers"] = 3
    model.apply_freezing()
    assert cache.fingerprint(vision) != split


def test_a_corrupt_entry_is_recomputed_and_counted(tmp_path):
    model, processor = build(*PARTIAL)
    model.eval()
    batch = batch_of(processor)
    cache = FeatureCache(tmp_path)
    cache.attach(model)
    with torch.no_grad():
        expected = model(**batch).logits
    entries = sorted(tmp_path.rglob("*.safetensors"))
    entries[0].write_bytes(b"not a safetensors file")
    entries[1].write_bytes(entries[1].read_bytes()[:40])  # truncated
    fresh = FeatureCache(tmp_path)
    fresh.attach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected)
    assert (fresh.stats.corrupt, fresh.stats.misses, fresh.stats.disk_hits) == (2, 2, 2)
    again = FeatureCache(tmp_path)  # the recomputed entries were rewritten whole
    again.attach(model)
    with torch.no_grad():
        model(**batch)
    assert (again.stats.corrupt, again.stats.disk_hits) == (0, 4)


def test_frozen_lower_layers_stay_in_eval_mode_in_training():
    model, _ = build(*PARTIAL)
    model.train()
    text, vision = model.encoders["text"], model.encoders["vision"]
    assert [m.training for m in text.lower_modules()] == [False] * 3  # embeddings and 2 of 3 layers
    assert text.backbone.encoder.layer[-1].training
    assert not any(m.training for lower in vision.lower_modules() for m in lower.modules())
    assert all(m.training for upper in vision.backbone.layers[-2:] for m in upper.modules())
    # Set to training behind the model's back: the next forward puts them back.
    text.backbone.train()
    text.encode_lower(
        {"input_ids": torch.tensor([[101, 2054, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    )
    assert not any(m.training for m in text.lower_modules())


def test_lower_layers_that_train_after_all_run_whole_and_are_not_cached(tmp_path):
    # E.g. a model loaded with from_pretrained, whose parameters all require gradients until
    # apply_freezing() runs: nothing is frozen, so nothing is split off or cached.
    model, processor = build(*PARTIAL)
    model.requires_grad_(True)
    assert all(encoder.lower_modules() is None for encoder in model.encoders.values())
    assert FeatureCache(tmp_path).attach(model) == []
    model.train()
    model(**batch_of(processor)).loss.backward()
    assert model.encoders["text"].backbone.embeddings.word_embeddings.weight.grad is not None
    model.apply_freezing()
    assert [m.training for m in model.encoders["text"].lower_modules()] == [False] * 3


def trainer_config(output_dir, feature_cache) -> dict:
    model = copy.deepcopy(TINY_MODEL)
    model["encoders"][0]["trainable_layers"] = 1  # text: split by layer
    model["encoders"][1]["trainable_layers"] = 0  # ViT: fully frozen
    return {
        "model": model,
        "data": {
            "streams": [
                {"name": "docs", "source": "pydoc", "weight": 1.0},
                {"name": "vqa", "source": "easy_vqa_vqa", "weight": 2.0},
            ],
            "seq_len": 48,
            "max_records": 8,  # few images and questions: later steps see them again
            "pack": True,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 2, "max_steps": 5, "batch_size": 4, "grad_accum": 2},
        "run": {
            "output_dir": str(output_dir),
            "log_every": 1,
            "eval_every": 2,
            "eval_batches": 2,
            "save_every": 2,
            "tensorboard": False,
            "feature_cache": feature_cache,
        },
    }


@pytest.fixture(scope="module")
def plain_and_cached_runs(tmp_path_factory):
    from metalm.training.config import config_from_dict
    from metalm.training.trainer import train

    root = tmp_path_factory.mktemp("runs")
    plain = train(config_from_dict(trainer_config(root / "plain", False)))
    cached_cfg = config_from_dict(trainer_config(root / "cached", str(root / "features")))
    return root, plain, cached_cfg, train(cached_cfg)


@pytest.mark.slow
def test_a_trainer_run_with_the_cache_gives_the_same_losses(plain_and_cached_runs):
    root, plain, _, cached = plain_and_cached_runs
    assert cached.losses == pytest.approx(plain.losses, abs=1e-5)
    assert cached.val_losses == pytest.approx(plain.val_losses, abs=1e-5)
    rows = [json.loads(line) for line in cached.metrics_path.read_text().splitlines()]
    rates = [row["feature_cache_hit_rate"] for row in rows if "feature_cache_hit_rate" in row]
    assert rates and rates[-1] > 0
    assert list((root / "features").rglob("*.safetensors"))
    assert "feature cache:" in (root / "cached" / "train.log").read_text()


@pytest.mark.slow
def test_a_resumed_run_with_the_cache_continues_exactly(plain_and_cached_runs, monkeypatch):
    from metalm.training import data as data_module
    from metalm.training.trainer import train

    root, plain, cached_cfg, _ = plain_and_cached_runs
    cfg = copy.deepcopy(cached_cfg)
    cfg.run.output_dir = str(root / "resumed")
    calls = {"n": 0}
    real = data_module.DataStream.next_batch

    def interrupted(self):
        if self.split == "train":
            calls["n"] += 1
            if calls["n"] > 6:  # dies during step 4 (2 micro-batches per step), after checkpoint-2
                raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(data_module.DataStream, "next_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(data_module.DataStream, "next_batch", real)
    resumed = train(cfg)  # its cache: the entries both earlier runs wrote, read from disk
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "checkpoint-2"
    assert resumed.losses == pytest.approx({k: plain.losses[k] for k in (3, 4, 5)}, abs=1e-5)


def test_evaluation_serves_a_loaded_models_frozen_encoders_from_the_cache(tmp_path):
    """A loaded model's parameters all require gradients; `cache_features` applies the config's freezing
    so that its frozen encoders are served from the cache, with the same outputs."""
    from metalm import MetaLMProcessor
    from metalm.model.feature_cache import cache_features
    from metalm.model.modeling_metalm import MetaLMForCausalLM

    model, processor = build(*FROZEN)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    loaded = MetaLMForCausalLM.from_pretrained(tmp_path / "model").eval()
    loaded_processor = MetaLMProcessor.from_pretrained(tmp_path / "model", config=loaded.config)
    batch = batch_of(loaded_processor)
    with torch.no_grad():
        plain = loaded(**batch).logits
    cache = cache_features(loaded, loaded_processor, tmp_path / "features")
    assert cache is not None and sorted(n for n, e in loaded.encoders.items() if e.feature_cache) == [
        "text",
        "vision",
    ]
    with torch.no_grad():
        first, second = loaded(**batch).logits, loaded(**batch).logits
    assert torch.allclose(first, plain, atol=1e-5) and torch.allclose(second, plain, atol=1e-5)
    assert cache.stats.memory_hits > 0 and list((tmp_path / "features").rglob("*.safetensors"))
    assert (
        cache_features(loaded, loaded_processor, tmp_path / "elsewhere") is cache
    )  # an attached one is kept
    # A model with no frozen encoder part has nothing to serve.
    trainable, trainable_processor = build(None, "vit", None)
    assert cache_features(trainable, trainable_processor, tmp_path / "other") is None


def test_scripts_evaluations_use_the_cache_as_metalm_eval_does(tmp_path, monkeypatch):
    from metalm.evaluation import experiments, runner
    from metalm.model.modeling_metalm import MetaLMForCausalLM

    monkeypatch.setenv("METALM_CACHE", str(tmp_path / "cache"))
    model, processor = build(*FROZEN)
    model.save_pretrained(tmp_path / "model")
    loaded = MetaLMForCausalLM.from_pretrained(tmp_path / "model")
    seen = []
    monkeypatch.setattr(runner, "evaluate", lambda model, *a, **kw: seen.append(model) or {})
    experiments.cached_eval(tmp_path / "out", loaded, processor, "easyvqa", [0, 4], [0])
    caches = {e.feature_cache for e in loaded.encoders.values()}
    assert seen == [loaded] and len(caches) == 1 and None not in caches
    assert next(iter(caches)).directory == tmp_path / "cache" / "features"


@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_a_server_keeps_frozen_features_in_memory_only(batching, tmp_path, monkeypatch):
    """`Engine(feature_cache_mb=...)`: demonstrations shown before every request are encoded once; the
    answers equal those of an engine with the cache off, and nothing is written to disk."""
    from metalm import MetaLMProcessor
    from metalm.model.modeling_metalm import MetaLMForCausalLM
    from metalm.serving.engine import Engine
    from metalm.serving.request_types import Demonstration, SamplingParams

    monkeypatch.setenv("METALM_CACHE", str(tmp_path / "cache"))
    model, processor = build(*FROZEN)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    def engine(megabytes: float) -> Engine:
        loaded = MetaLMForCausalLM.from_pretrained(tmp_path / "model")
        loaded_processor = MetaLMProcessor.from_pretrained(tmp_path / "model", config=loaded.config)
        return Engine(loaded, loaded_processor, device="cpu", batching=batching, feature_cache_mb=megabytes)

    demos = [Demonstration("blue", "what colour is it?", [image(i)]) for i in range(3)]
    cached, plain = engine(64), engine(0)
    assert plain.feature_cache is None and cached.feature_cache is not None
    params = SamplingParams(max_new_tokens=4, temperature=0)
    answers = {}
    for name, server in (("cached", cached), ("plain", plain)):
        prompts = server.prompts
        answers[name] = [
            server.generate(
                prompts.demonstration_parts(demos)
                + prompts.request_parts(question="and this?", images=[image(9 + i)]),
                params,
            )
            .completions[0]
            .token_ids
            for i in range(3)
        ]
    stats = cached.feature_cache.stats
    # Each request: three demonstrations (an image each, one question asked of all) and a new image with a
    # question of its own. Distinct rows of a request: 2 questions and 4 images; the first computes all six,
    # each later one only its new image and reads the other five.
    assert answers["cached"] == answers["plain"]
    assert (stats.misses, stats.memory_hits) == (6 + 1 + 1, 5 + 5)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="feature_cache_mb"):
        engine(-1)


def test_a_server_with_a_partly_frozen_encoder_and_similar_demonstrations(tmp_path):
    """Retrieval (`--choose similar`) reads the pool and each request through the same encoders, outside the
    generation's inference mode; with trainable upper layers the cached lower states feed both paths."""
    from metalm import MetaLMProcessor
    from metalm.model.modeling_metalm import MetaLMForCausalLM
    from metalm.serving.demonstrations import attach_demonstrations
    from metalm.serving.engine import Engine
    from metalm.serving.request_types import ChatMessage, Demonstration, SamplingParams

    model, processor = build(*PARTIAL)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    answers = {}
    for megabytes in (64, 0):
        loaded = MetaLMForCausalLM.from_pretrained(tmp_path)
        engine = Engine(
            loaded, MetaLMProcessor.from_pretrained(tmp_path), device="cpu", feature_cache_mb=megabytes
        )
        demos = [Demonstration("blue", "what colour is it?", [image(i)]) for i in range(4)]
        attach_demonstrations(engine, demos, 2, "similar")
        params = SamplingParams(max_new_tokens=3, temperature=0)
        answers[megabytes] = [
            engine.generate(engine.chat_parts([ChatMessage("user", "what colour?", [image(9 + i)])]), params)
            .completions[0]
            .token_ids
            for i in range(2)
        ]
        engine.close()
    assert answers[64] == answers[0]
