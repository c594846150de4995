"""The in-context bars of the results page (scripts/interface_results.py): each bar with the figures it is
judged on and its verdict, what the answers that change with demonstrations become, and the variants tried."""

from __future__ import annotations

from typing import Any

from metalm.evaluation.breakdown import QUESTION_TYPES, flips_sentence
from metalm.evaluation.reads_encoder import gap_closed


def pm(mean: float | None, std: float | None = None) -> str:
    """A mean, with its spread when there is one; "—" for a figure not measured."""
    if mean is None:
        return "—"
    return f"{mean:.1f}" if not std else f"{mean:.1f} ± {std:.1f}"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def _subset_pairs(vqa: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """Each question type's mean at k = 0 and at k = 4 on the page's easy-VQA subset (None: not measured)."""
    return {t: tuple(vqa[k]["by_type"].get(t, {}).get("mean") for k in ("0", "4")) for t in QUESTION_TYPES}


def _vqa_bar(name: str, vqa: dict[str, Any]) -> str:
    """The by-type bar judged on the page's easy-VQA subset (its types as they come in the split)."""
    pairs = _subset_pairs(vqa)
    shown = ", ".join(
        f"{t} {a:.1f} → {b:.1f}" for t, (a, b) in pairs.items() if a is not None and b is not None
    )
    ok = all(b >= a for a, b in pairs.values() if a is not None and b is not None)
    # How far below, in answers: a shortfall of a fraction of one answer a seed is within noise.
    short = [
        f"{t} {a - b:.1f} below k = 0: {(a - b) * vqa['0']['by_type'][t]['n'] / 100:.1f} of "
        f"{vqa['0']['by_type'][t]['n']} answers a seed"
        for t, (a, b) in pairs.items()
        if a is not None and b is not None and b < a
    ]
    verdict = _verdict(ok) + (f" ({'; '.join(short)})" if short else "")
    return f"| {name} | easy-VQA by question type, k = 4 ≥ k = 0 (mean of seeds) | {shown} | {verdict} |"


def _paired_vqa_bar(name: str, change: dict[str, dict[str, float]]) -> str:
    """The by-type bar judged on as many questions of each type, the same questions at k = 0 and 4: each
    change with its 95 % interval, and whether a shortfall is larger than that interval."""
    types = [t for t in QUESTION_TYPES if t in change]
    shown = ", ".join(
        f"{t} {change[t]['from']:.1f} → {change[t]['to']:.1f} ({change[t]['mean']:+.1f} ± {change[t]['ci95']:.1f})"
        for t in types
    )
    n = ", ".join(sorted({str(change[t]["n"]) for t in types}))
    short = [t for t in types if change[t]["mean"] < 0]
    notes = [
        f"{t} {-change[t]['mean']:.1f} below k = 0, "
        + ("beyond" if -change[t]["mean"] > change[t]["ci95"] else "within")
        + " its 95 % interval"
        for t in short
    ]
    verdict = _verdict(not short) + (f" ({'; '.join(notes)})" if notes else "")
    return (
        f"| {name} | easy-VQA by question type, k = 4 ≥ k = 0 (mean of seeds; {n} questions a type, the "
        f"same at both k; change ± 95 % interval) | {shown} | {verdict} |"
    )


def _icl_bars(name: str, r: dict[str, Any]) -> list[str]:
    """The in-context bars for one model, each with the measured figures it is judged on."""
    rows = []
    if "easyvqa_by_type" in r:
        rows.append(_paired_vqa_bar(name, r["easyvqa_by_type"]))
    elif "0" in r["easyvqa"] and "4" in r["easyvqa"]:
        rows.append(_vqa_bar(name, r["easyvqa"]))
    binding = (r.get("fastbind") or {}).get("fastbind-shape-2way")
    if binding and "1" in binding and "4" in binding:
        bar = 80 if name.startswith("gemma-vl") else 70
        k1, k4 = binding["1"]["mean"]["accuracy"], binding["4"]["mean"]["accuracy"]
        rows.append(
            f"| {name} | fast binding, shape 2-way, made-up names, 4 per class ≥ {bar} % and rising from k = 1 "
            f"| k = 1 {k1:.1f}, k = 4 {k4:.1f} | {_verdict(k4 >= bar and k4 > k1)} |"
        )
    topic = r.get("bbc-topic", {})
    if "encoded" in topic and "plain" in topic:
        shots = [k for k in topic["encoded"] if k != "0" and k in topic["plain"]]
        cells = [
            (k, topic["encoded"][k]["mean"]["accuracy"], topic["plain"][k]["mean"]["accuracy"]) for k in shots
        ]
        shown = ", ".join(f"k = {k}: {e:.1f} vs {p:.1f}" for k, e, p in cells)
        verdict = _encoder_vs_text_verdict([(e, p) for _, e, p in cells], r.get("bbc_majority"))
        rows.append(
            f"| {name} | BBC topic, demonstrations through the encoder ≥ as plain text − 5 | {shown} | {verdict} |"
        )
    probe = r.get("reads_encoder")
    if probe:
        gap = gap_closed(probe["loss"])
        shown = "—" if gap is None else f"{gap:.2f}"
        rows.append(
            f"| {name} | does the decoder read the encoder: gap closed ≥ 0.50 | {shown} | {_verdict(None if gap is None else gap >= 0.5)} |"
        )
    return rows


def _encoder_vs_text_verdict(cells: list[tuple[float, float]], majority: float | None) -> str:
    """The BBC bar on (through the encoder, as plain text) pairs: met when the encoder is within 5 points of
    plain text at every k, "only vacuously" when both are at or below always answering the majority topic."""
    verdict = _verdict(all(e >= p - 5 for e, p in cells) if cells else None)
    if verdict == "met" and majority is not None and all(max(e, p) <= majority for e, p in cells):
        return f"met only vacuously: both at or below always answering the majority topic ({majority:.1f})"
    return verdict


def _bar_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| model | bar | measured | verdict |", "|---|---|---|---|"]
    for name in ("quickstart", "gemma-vl", "gemma-vl-icl"):
        if name in results:
            rows += _icl_bars(name, results[name])
    return rows


def _variant_rows(variants: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Each variant beside the preset it varies: easy-VQA by type at k = 0 → 4 (on the balanced questions
    when measured), fast binding shape 2-way generated and ranked, the copy probe, the encoder probe, and BBC
    topics in context through the encoder (a variant with a text encoder)."""
    rows = [
        "| model | config | easy-VQA k = 0 → 4: colour | shape | yes/no | fast binding shape 2-way, k = 1 / 4 "
        "| ranked, k = 4 (chance 50) | the same episodes, asked the colour, k = 4 | copies a repeat: nats saved "
        "| reads the encoder: gap closed | BBC topic through the encoder, k = 0 / 1 / 4 (majority topic) |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    presets = {v["preset"]: {**results[v["preset"]], "config": f"configs/{v['preset']}.yaml"}
               for v in variants.values() if v["preset"] in results}  # fmt: skip
    for name, entry in {**presets, **variants}.items():
        binding = entry.get("fastbind") or {}
        shape = binding.get("fastbind-shape-2way", {})
        bind = " / ".join(pm(shape[k]["mean"]["accuracy"]) if k in shape else "—" for k in ("1", "4"))
        ranked = binding.get("fastbind-shape-2way-ranked", {}).get("4")
        asked = binding.get("fastbind-shape-2way-ask-color", {}).get("4")
        copy = entry.get("copying")
        probe = entry.get("reads_encoder")
        gap = gap_closed(probe["loss"]) if probe else None
        cells = [
            *_by_type_cells(entry),
            bind,
            pm(ranked["mean"]["accuracy"]) if ranked else "—",
            pm(asked["mean"]["accuracy"]) if asked else "—",
            f"{copy['first_loss'] - copy['repeat_loss']:.2f}" if copy else "—",
            "—" if gap is None else f"{gap:.2f}",
            _bbc_cell(entry),
        ]
        rows.append(f"| {name} | `{entry['config']}` | " + " | ".join(cells) + " |")
    return rows


def _bbc_cell(entry: dict[str, Any]) -> str:
    """BBC topic accuracy with demonstrations through the encoder at k = 0 / 1 / 4, and the majority share."""
    encoded = entry.get("bbc-topic", {}).get("encoded")
    if not encoded:
        return "—"
    shown = " / ".join(pm(encoded[k]["mean"]["accuracy"]) if k in encoded else "—" for k in ("0", "1", "4"))
    majority = entry.get("bbc_majority")
    return shown + ("" if majority is None else f" ({majority:.1f})")


def _by_type_cells(entry: dict[str, Any]) -> list[str]:
    """easy-VQA k = 0 → 4 per question type: the balanced, paired figures when measured, else the subset's."""
    paired = entry.get("easyvqa_by_type")
    if paired:
        return [
            f"{paired[t]['from']:.1f} → {paired[t]['to']:.1f} ({paired[t]['mean']:+.1f} ± {paired[t]['ci95']:.1f})"
            if t in paired
            else "—"
            for t in QUESTION_TYPES
        ]
    pairs = _subset_pairs(entry["easyvqa"]).values()
    return ["—" if a is None or b is None else f"{a:.1f} → {b:.1f}" for a, b in pairs]


def _why_no_binding(results: dict[str, Any]) -> str:
    """What the copy probe and the ranked twin say of each model scored on both, from their figures."""
    out = []
    for name, r in results.items():
        ranked = (r.get("fastbind") or {}).get("fastbind-shape-2way-ranked", {}).get("4")
        copy = r.get("copying")
        if not ranked or not copy:
            continue
        gain = copy["first_loss"] - copy["repeat_loss"]
        copies = (
            f"copies an exact repeat ({gain:.1f} nats below its first showing)"
            if gain > 1.0
            else (
                f"does not copy even an exact repeat ({copy['repeat_loss']:.2f} nats on the repeat, "
                f"{copy['first_loss']:.2f} on the first showing)"
            )
        )
        prefers = ranked["mean"]["accuracy"]
        out.append(f"{name}'s decoder {copies} and, ranked, picks the right name at k = 4 in {prefers:.1f} %")
    if not out:
        return ""
    return (
        "What the probes of the fast-binding section add (copying; the ranked twin, chance 50 %): "
        + "; ".join(out)
        + ". A decoder that copies but was never taught to match a query image to a demonstration's (gemma-vl, "
        "its Gemma frozen) prefers neither name; one that does not copy at all has nothing to bind with, and "
        "the copy-training probe says how far it is from learning to. "
    )


def _flip_lines(results: dict[str, Any]) -> list[str]:
    """For each question type that answers worse with demonstrations, what its changed answers become."""
    out = []
    for name, r in results.items():
        for t, change in (r.get("easyvqa_by_type") or {}).items():
            flips = (r.get("easyvqa_flips") or {}).get(t)
            if change["mean"] >= 0 or not flips:
                continue
            out.append(f"{name}, {t}: {flips_sentence(flips)}")
    if not out:
        return []
    return [
        "Where a type answers worse with demonstrations, the answers that change (each k = 4 seed against "
        "the k = 0 run, the same questions): " + "; ".join(out) + ".",
        "",
    ]


def _retrieved_row(name: str, similar: dict[str, Any], majority: float | None = None) -> str:
    """One model's figures with retrieved demonstrations: easy-VQA by type k = 0 -> 4 with the vote at k = 4,
    and BBC through the encoder and as plain text at each k with the vote and the encoder-vs-text bar."""
    vqa = _by_type_cells(similar)  # its `easyvqa_by_type`, as the variants' rows show theirs
    encoded, plain = similar.get("bbc-topic-encoded", {}), similar.get("bbc-topic-plain", {})
    shots = sorted(plain, key=int)

    def scores(by_k: dict[str, Any]) -> str:
        return " / ".join(pm(by_k[k]["accuracy"]) if k in by_k else "—" for k in shots) or "—"

    votes = " / ".join(pm(plain[k]["vote"]) for k in shots) or "—"
    cells = [(encoded[k]["accuracy"], plain[k]["accuracy"]) for k in shots if k in encoded]
    verdict = _encoder_vs_text_verdict(cells, majority)
    return (
        f"| {name} | " + " | ".join(vqa) + f" | {pm(similar.get('easyvqa_vote'))} | {scores(encoded)} | "
        f"{scores(plain)} | {votes} | {verdict} |"
    )


def retrieved_section(results: dict[str, Any]) -> list[str]:
    """The in-context bars' figures again with demonstrations retrieved like each query, beside the vote of
    those demonstrations (what they give with no decoder); no verdict of the bars above changes with them."""
    measured = {name: r["similar"] for name, r in results.items() if r.get("similar")}
    if not measured:
        return []
    shots = sorted({k for s in measured.values() for k in s.get("bbc-topic-plain", {})}, key=int)
    ks = " / ".join(shots)
    return [
        "## The same in-context figures with demonstrations chosen like the query",
        "",
        "The paper, and the bars above, draw demonstrations at random. Here each query's demonstrations are the "
        "training examples its model's own encoders find most like it (`metalm eval --demos similar`; RICES in "
        "Flamingo, KATE for GPT-3), the most similar next to the query, in the same layout; retrieval does not "
        "depend on the seed, so each k runs once. easy-VQA: k = 0 → 4 on the by-type bar's questions (change ± "
        "95 % interval); BBC: the same articles as above, encoded and as plain text with the same retrieved "
        "articles. Vote: how often the answer most of the retrieved demonstrations show is the gold one (ties: "
        "the most similar one's), what a nearest-neighbour classifier scores with no decoder at all; a model at "
        "its vote adds nothing to retrieval. This is not the paper's protocol and changes no verdict above.",
        "",
        f"| model | easy-VQA colour | shape | yes/no | easy-VQA vote, k = 4 | BBC k = {ks}, through the encoder "
        f"| BBC k = {ks}, as plain text | BBC vote, k = {ks} | encoder ≥ plain text − 5 |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
        *(
            _retrieved_row(name, similar, results[name].get("bbc_majority"))
            for name, similar in measured.items()
        ),
        "",
    ]


def bar_sections(results: dict[str, Any], variants: dict[str, Any]) -> list[str]:
    lines = ["## The in-context bars, judged on the figures above", "", *_bar_rows(results), ""]
    lines += _flip_lines(results)
    lines.append(
        'What the presets train for it (docs/training.md, "The in-context format"): both add easy-VQA '
        "in-context rows beside their single VQA stream (random demonstrations and a query in one window that "
        "attends across them, every answer trained): the quickstart 2–6 demonstrations per 128 positions, "
        "gemma-vl 2–5 per 112. Rows whose answers are renamed by made-up words (`relabel`, the skill fast "
        "binding tests) are in neither: gemma-vl's Gemma is frozen, and with such rows it stayed at chance. "
        "gemma-vl-icl is the second stage that trains them, with LoRA adapters on Gemma's attention "
        "(`configs/gemma-vl-icl.yaml`). Tried for the quickstart: relabelled rows as a quarter of its "
        "in-context rows, and extra steps of relabelled rows: 600 steps from the trained quickstart, two "
        "thirds of them binding batches (15.5 min), lowered their answer loss from 9.0 to 2.7 nats but it "
        "copied only the later pieces of a word (`veki` for `kiki`), never the first: 0 % at k = 1 and 4. "
        "Made-up words of uniform random letters instead (`relabel_words: letters`, which no prior over word "
        "shapes predicts, so that only copying lowers their loss; `configs/ablations/quickstart-binding-letters"
        ".yaml`): 300 such steps (7.5 min) left the answer "
        "loss at 4.3 nats a token and the answers at 0 % (`qq` for `tufa`). "
        "Trained on nothing but binding rows and made-up repeats, from scratch or from a decoder first "
        "trained to copy (`configs/ablations/quickstart-binding-only.yaml`, `quickstart-copy-first.yaml`; "
        "their comments give what was measured), it learns to answer with one of the row's made-up words "
        "but picks the right one little better than chance: matching the query image to a demonstration's "
        "is what it does not learn within these budgets. "
        + (
            "Trained from scratch with what binding needs beside the quickstart's own streams (made-up words "
            "repeated, whose repeats only copying predicts, and binding rows; or interleaved documents whose "
            'text refers back across images): the variants in "Tried and left out" below. '
            if any(v.get("preset") == "quickstart" for v in variants.values())
            else ""
        )
        + _why_no_binding(results)
        + (
            "In-context rows of two text-classification tasks other than BBC's (WordNet categories, GCIDE parts "
            "of speech; MetaICL's recipe) beside gemma-vl-icl's streams: `gemma-vl-icl-text` below, its BBC "
            "column."
            if "gemma-vl-icl-text" in variants
            else "Not in this invocation: in-context rows of text-classification tasks other than BBC's "
            "(`configs/ablations/gemma-vl-icl-text.yaml`; `--variants gemma-vl-icl-text` adds it)."
        )
    )
    lines.append("")
    if variants:
        lines += [
            "## Tried and left out",
            "",
            "Variants of a preset, trained and evaluated by this script the same way (their configs under "
            "`configs/ablations/` say what differs). easy-VQA: k = 0 → 4 on the questions the by-type bar is "
            "judged on (change ± 95 % interval); ranked: which of the episode's two names is likelier; asked the "
            "colour: the same episodes, the query asked its colour (`fastbind-shape-2way-ask-color`: right when "
            "it answers the real colour); copies a repeat: how many nats the copy probe's repeat is below its "
            "first showing (fast-binding section).",
            "",
            *_variant_rows(variants, results),
            "",
        ]
    return lines
