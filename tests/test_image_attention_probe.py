"""scripts/image_attention_probe.py: its masks keep an image (and, with own-image, its example's text) from
reading the other examples' images, and change nothing else."""

from __future__ import annotations

import torch

from metalm.evaluation.icl import build_prompt, prompt_to_sample
from metalm.evaluation.tasks import Example, builtin_task, in_model_layout
from tests.conftest import load_script


def test_masks_on_a_hand_made_layout():
    probe = load_script("image_attention_probe")
    # pad, BOS, image A (2 slots), text, image B (2 slots), text
    real = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    image = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    causal = probe.attention_mask(real, image, "causal")[0, 0]
    alone = probe.attention_mask(real, image, "image-alone")[0, 0]
    own = probe.attention_mask(real, image, "own-image")[0, 0]
    assert causal[7, 1:].all() and not causal[7, 0] and not causal[2, 3]  # causal, padding hidden
    assert alone[5].tolist() == [0, 1, 0, 0, 0, 1, 0, 0]  # image B: BOS and itself only
    assert alone[6].tolist() == [0, 1, 0, 0, 0, 1, 1, 0]
    assert alone[3].tolist() == causal[3].tolist()  # image A has nothing before it but BOS
    assert alone[7].tolist() == causal[7].tolist()  # text rows keep causal attention
    assert own[7].tolist() == [0, 1, 0, 0, 1, 1, 1, 1]  # the query's text: not image A
    assert own[4].tolist() == causal[4].tolist()  # the first example's text sees its own image
    assert own[0, 0]  # a padding row attends to itself (no empty softmax)


def _query_states(model, processor, demo_image: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states at the query's image slots and at its last position, after one
    demonstration whose image is `demo_image`."""
    probe = load_script("image_attention_probe")
    task = in_model_layout(builtin_task("easyvqa"), model.config)
    query = task.examples(task.eval_split)[0]
    demo = Example(id="d", fields={"question": "what shape is this?"}, answers=("circle",), image=demo_image)
    sample = prompt_to_sample(processor, build_prompt(task, query, [demo]))
    batch = processor.collate([sample], padding_side="left")
    image = batch["encoder_slots"]["vision"].bool()
    embeds = model.embed_inputs(batch["input_ids"], batch["encoder_inputs"], batch["encoder_slots"])
    mask = probe.attention_mask(batch["attention_mask"].bool(), image, kind)
    with torch.no_grad():
        out = model.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=batch["position_ids"],
            output_hidden_states=True, use_cache=False,
        )  # fmt: skip
    states = out.hidden_states[-1][0]
    slots = torch.nonzero(image[0]).flatten()
    return states[slots[len(slots) // 2 :]], states[-1]  # the query's image is the second of two


def test_image_alone_reads_the_query_image_without_the_demonstrations(tiny):
    model, processor = tiny
    model.eval()
    images = [ex.image for ex in builtin_task("easyvqa").examples("train")[:40]]
    first, second = images[0], next(i for i in images if i != images[0])
    a_img, a_last = _query_states(model, processor, first, "image-alone")
    b_img, b_last = _query_states(model, processor, second, "image-alone")
    assert torch.allclose(a_img, b_img, atol=1e-5) and not torch.allclose(a_last, b_last, atol=1e-5)
    c_img, _ = _query_states(model, processor, first, "causal")
    d_img, _ = _query_states(model, processor, second, "causal")
    assert not torch.allclose(c_img, d_img, atol=1e-5)  # causal: the query's image reads the demonstration


def test_summary_pairs_the_same_questions():
    """The table's changes are per-question differences averaged, with their interval."""
    probe = load_script("image_attention_probe")

    def rows(rights: list[int]) -> list[dict]:
        return [{"id": f"q{i}", "group": "colour", "right": r} for i, r in enumerate(rights)]

    results = {"k0": rows([1, 1, 1, 1])}
    for kind, rights in (
        ("causal", [1, 0, 1, 1]),
        ("image-alone", [0, 0, 1, 1]),
        ("own-image", [1, 1, 1, 1]),
    ):
        for seed in (0, 1):
            results[f"k4-{kind}-s{seed}"] = rows(rights)
    lines = probe.summary_lines(results, 4)
    assert lines[2] == "| colour (n=4) | k = 0 | 100.0 | – | – |"
    assert lines[3] == "| colour (n=4) | k = 4, causal | 75.0 | -25.0 ± 49.0 | – |"
    assert lines[5] == "| colour (n=4) | k = 4, own-image | 100.0 | +0.0 ± 0.0 | +25.0 ± 49.0 |"
