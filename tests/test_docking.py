"""Docking onto a pretrained-style decoder: text parts join as the decoder's tokenizer expects, HF vision
towers get their own normalisation, connectors start on the decoder's embedding scale, the frozen decoder
trains connectors under bf16 autocast, and the LM head runs only where a label is set."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from metalm import Encode, ImageInput, Target
from metalm.data.images import EFFICIENTNET_LITE0_MEAN
from metalm.data.processor import part_separator
from metalm.modalities.vision import image_preprocessor_for
from metalm.recipe import connector_rms, embedding_rms, load_tokenizer, probe_image
from tests.gemma_tiny import gemma_recipe, write_bpe_tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return str(write_bpe_tokenizer(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def gemma(bpe_dir):
    torch.manual_seed(0)
    model, processor = gemma_recipe(bpe_dir).build()
    return model.eval(), processor


def _decoded_text(processor, sample) -> str:
    ids = [i for seg in sample if hasattr(seg, "ids") for i in seg.ids]
    return processor.tokenizer.decode(ids, skip_special_tokens=True)


# --- text parts ------------------------------------------------------------------------------------------
def test_separator_is_measured_from_the_tokenizer(bpe_dir):
    assert part_separator(load_tokenizer(bpe_dir)) == " "  # byte-level BPE glues parts together
    assert part_separator(load_tokenizer("packaged:minilm-l6")) == ""  # WordPiece splits on whitespace


def test_byte_bpe_parts_join_as_words(gemma):
    _, processor = gemma
    sample = processor.build_sample(["Hello", Target("world")], add_bos=False)
    assert _decoded_text(processor, sample) == "Hello world"
    # The target is " world" as running text tokenises it, so its loss is on the word with its space.
    assert sample[1].ids == processor.tokenize(" world")
    assert sample[1].loss and not sample[0].loss


def test_parts_keep_whitespace_already_at_the_junction(gemma):
    _, processor = gemma
    for parts, text in [
        (["Question:\n", "answer"], "Question:\nanswer"),
        (["answer:", Target(" red")], "answer: red"),
        (["a ", "b", "c"], "a b c"),
    ]:
        assert _decoded_text(processor, processor.build_sample(parts, add_bos=False)) == text


def test_text_after_an_image_or_encoded_span_starts_fresh(gemma):
    """Only text-to-text junctions get the separator: decoder text after an image or an encoded span is
    tokenised on its own, as the training samples tokenise a prompt after `[image] Enc(question)`."""
    _, processor = gemma
    sample = processor.build_sample([ImageInput(probe_image(32)), Encode("what colour"), "answer:"])
    assert sample[-1].ids == processor.tokenize("answer:")


def test_wordpiece_parts_are_unchanged():
    from tests.conftest import build_tiny

    _, processor = build_tiny()
    sample = processor.build_sample(["Hello", Target("world")], add_bos=False)
    assert [seg.ids for seg in sample] == [processor.tokenize("Hello"), processor.tokenize("world")]
    assert _decoded_text(processor, sample) == "hello world"


# --- image normalisation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type, mean, crop",
    [
        ("clip_vision_model", OPENAI_CLIP_MEAN, True),
        ("siglip_vision_model", (0.5, 0.5, 0.5), False),
        ("vit", (0.5, 0.5, 0.5), False),
    ],
)
def test_hf_tower_uses_its_own_processor_defaults(model_type, mean, crop):
    spec = {"backbone": "hf", "config": {"model_type": model_type}, "image_size": 32}
    pre = image_preprocessor_for(spec)
    assert pre.mean == pytest.approx(mean) and pre.center_crop is crop and pre.size == 32


def test_efficientnet_keeps_its_inception_normalisation():
    pre = image_preprocessor_for({"backbone": "efficientnet_lite0", "image_size": 64})
    assert pre.mean == pytest.approx(EFFICIENTNET_LITE0_MEAN)


def test_tower_folder_preprocessor_config_wins(tmp_path, bpe_dir):
    """A tower loaded from a folder reads its preprocessor_config.json (mean, std, filter, crop)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from metalm import EncoderRecipe, ModelRecipe

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32
    )
    CLIPVisionModel(config).save_pretrained(tmp_path)
    settings = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.7, 0.6, 0.5], "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**settings, "do_center_crop": False}))
    from tests.gemma_tiny import TINY_GEMMA

    recipe = ModelRecipe(
        decoder=TINY_GEMMA,
        tokenizer=bpe_dir,
        encoders=[EncoderRecipe("vision", "vision", source=str(tmp_path), image_size=32)],
    )
    model, processor = recipe.build()
    pre = processor.preprocessors_of_kind("vision")["vision"]
    assert pre.mean == pytest.approx((0.1, 0.2, 0.3)) and pre.std == pytest.approx((0.7, 0.6, 0.5))
    assert pre.resample == "bilinear" and not pre.center_crop
    # The saved processor keeps it.
    from metalm.data.processor import MetaLMProcessor

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    assert (
        MetaLMProcessor.from_pretrained(tmp_path / "saved").preprocessors_of_kind("vision")["vision"] == pre
    )


# --- embedding scale -------------------------------------------------------------------------------------
def test_connector_outputs_start_on_the_embedding_scale(gemma):
    model, processor = gemma
    target = embedding_rms(model, processor)
    # Gemma's embedding multiplies by sqrt(d) = 8 inside: the target is measured after it.
    weight_rms = float(model.get_input_embeddings().weight.detach().pow(2).mean().sqrt())
    assert target == pytest.approx(8 * weight_rms, rel=0.2)
    for name in ("text", "vision"):
        assert connector_rms(model, processor, name) == pytest.approx(target, rel=1e-3)


def test_scale_holds_for_other_inputs(gemma):
    """Calibrated on the probe, the slots stay within a small factor of the words on other inputs."""
    model, processor = gemma
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    batch = processor([[ImageInput(image), Encode("a quick brown fox jumps over the dog")]])
    with torch.no_grad():
        target = embedding_rms(model, processor)
        for name, payload in batch["encoder_inputs"].items():
            rms = float(model.encode(name, payload).pow(2).mean().sqrt())
            assert target / 3 < rms < target * 3, name


# --- LM head only where a label is set -----------------------------------------------------------------
def _training_batch(processor):
    image = Image.new("RGB", (32, 32), (20, 200, 30))
    samples = [
        processor.build_sample([ImageInput(image), Encode("what colour is it"), "answer:", Target("green")]),
        processor.build_sample(["The news today", Encode("covers sport"), Target("and the weather.")]),
        processor.build_sample([Target("Hello world. The quick brown fox jumps over the lazy dog.")]),
    ]
    return processor.collate(samples, padding_side="right")


def _full_head_loss(model, batch, **kwargs):
    embeds = model.embed_inputs(batch["input_ids"], batch["encoder_inputs"], batch["encoder_slots"])
    return model.decoder(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        labels=batch["labels"],
        **kwargs,
    ).loss


@pytest.mark.parametrize("num_items", [None, 7.0])
def test_labelled_head_loss_equals_full_head_loss(gemma, num_items):
    model, processor = gemma
    batch = _training_batch(processor)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    out = model(**batch, labelled_logits_only=True, **kwargs)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert out.logits.shape == (targets, model.config.text_config.vocab_size)
    full = _full_head_loss(model, batch, **kwargs)
    torch.testing.assert_close(out.loss, full, rtol=1e-5, atol=1e-6)
    # In eval mode (the default here) the logits keep their usual shape, with the same loss.
    usual = model(**batch, **kwargs)
    assert usual.logits.shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(usual.loss, full, rtol=1e-5, atol=1e-6)


def test_training_mode_runs_the_head_on_labelled_positions_only(gemma):
    model, processor = gemma
    batch = _training_batch(processor)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    try:
        model.train()
        with torch.no_grad():
            assert model(**batch).logits.shape[0] == targets
    finally:
        model.eval()


def test_labelled_head_gradients_equal_full_head_gradients(gemma):
    model, processor = gemma
    batch = _training_batch(processor)
    grads = []
    for loss_fn in (
        lambda: model(**batch, labelled_logits_only=True).loss,
        lambda: _full_head_loss(model, batch),
    ):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)


def test_prefill_keeps_only_the_last_position(gemma):
    model, processor = gemma
    batch = processor([[ImageInput(probe_image(32)), "answer:"]])
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, logits_to_keep=1).logits
        full = model(**batch).logits
    assert logits.shape[1] == 1
    torch.testing.assert_close(logits[:, 0], full[:, -1])
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


# --- frozen decoder, bf16 autocast on CPU ------------------------------------------------------------------
def test_frozen_decoder_trains_connectors_under_bf16_autocast(bpe_dir):
    torch.manual_seed(0)
    model, processor = gemma_recipe(bpe_dir, decoder_trainable=False).build()
    model.train()
    assert not any(p.requires_grad for p in model.decoder.parameters())
    batch = _training_batch(processor)
    with torch.no_grad():
        reference = model(**batch).loss
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(float(reference), rel=0.05)
    loss.backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    for name in ("text", "vision"):
        grads = [p.grad for p in model.connectors[name].parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("connector", ["linear", "mlp", "resampler"])
def test_every_connector_type_is_put_on_the_embedding_scale(bpe_dir, connector):
    from metalm import EncoderRecipe, ModelRecipe
    from tests.conftest import TINY_BERT
    from tests.gemma_tiny import TINY_GEMMA

    spec = {"type": connector, "num_heads": 4, "num_queries": 4} if connector == "resampler" else connector
    model, processor = ModelRecipe(
        decoder=TINY_GEMMA,
        tokenizer=bpe_dir,
        encoders=[
            EncoderRecipe(
                "text",
                "text",
                source="config",
                config=TINY_BERT,
                tokenizer="packaged:minilm-l6",
                connector=spec,
            )
        ],
    ).build()
    model.eval()
    assert connector_rms(model, processor, "text") == pytest.approx(embedding_rms(model, processor), rel=1e-3)
