"""Standard evaluation metrics.

* VQA: :func:`normalize_vqa_answer`, :func:`vqa_accuracy` (official VQA v2 answer normalization and
  leave-one-out accuracy).
* Captioning: :func:`caption_scores` (CIDEr, BLEU-1..4, ROUGE-L through ``pycocoevalcap`` with the
  Stanford PTB tokenizer, with a documented fallback when Java is missing).
* Classification: :func:`accuracy`, :func:`macro_f1`.
* Text / span QA: :func:`rouge_l`, :func:`squad_f1`, :func:`exact_match`.

All scores are returned on their native scale (fractions in ``[0, 1]``; CIDEr on its raw ``~0-10`` scale).
Reporting code multiplies by 100 where papers do (e.g. "CIDEr 110.2" is ``1.102`` here).
"""

from __future__ import annotations

import os
import re
import shutil
import string
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------------
# The tables and the two processing steps below reproduce the official VQA evaluation code,
# ``VQAEval`` in ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of github.com/GT-Vision-Lab/VQA
# (Aishwarya Agrawal), including its quirks:
#   * the contractions table maps the apostrophe-less spelling to the apostrophe form ("isnt" -> "isn't");
#     the apostrophe itself is not in the punctuation list, so "isn't" stays "isn't";
#   * the table contains capitalised keys ("Im", "Ive", ...) that can never match because words are
#     lower-cased first, and the odd entry "somebody'd" -> "somebodyd";
#   * ``periodStrip`` has a typo'd look-behind ``(?!<=\d)`` (really a look-ahead), so it strips any "."
#     not followed by a digit;
#   * ``re.UNICODE`` is passed positionally to ``Pattern.sub``, i.e. as ``count`` (= 32).

VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
VQA_MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES: tuple[str, ...] = ("a", "an", "the")
VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
VQA_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip


def _vqa_strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``."""
    out = text
    for p in VQA_PUNCT:
        if (p + " " in text or " " + p in text) or VQA_COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # Official: ``self.periodStrip.sub("", outText, re.UNICODE)`` -> count=int(re.UNICODE) == 32.
    return VQA_PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _vqa_process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower-case, number words -> digits, drop articles, contractions."""
    words = []
    for word in text.lower().split():
        word = VQA_MANUAL_MAP.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(word)
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(ans: str) -> str:
    """Official VQA v2 answer normalization (whitespace, punctuation, digits, articles, contractions).

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    """
    return _vqa_process_digit_article(_vqa_process_punctuation(_vqa_strip_whitespace(ans)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, strict_official: bool = False) -> float:
    """VQA accuracy of one prediction against the human answers, in ``[0, 1]``.

    With 10 (or more) answers this is the official VQA v2 metric: for each of the ``n`` leave-one-out
    subsets of ``n - 1`` answers, ``min(#matching answers / 3, 1)``, averaged over the subsets. (With
    10 answers: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.0.)

    With fewer than 10 answers (e.g. easy-VQA's single answer) the leave-one-out formula is not meaningful
    (a single answer would always score 0), so this reduces to exact match after normalization: 1.0 if
    the normalized prediction equals any normalized answer, else 0.0.

    By default prediction and answers are always normalized with :func:`normalize_vqa_answer`. The
    official script only normalizes when the human answers disagree (``len(set(answers)) > 1``) and
    otherwise compares the whitespace-stripped raw strings; ``strict_official=True`` reproduces that.
    (Official VQA v2 annotations are already normalized, so the two agree except when the raw prediction
    differs from a unanimous answer only by normalization, e.g. "two" vs ten times "2".)
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = _vqa_strip_whitespace(prediction)
    gts = [_vqa_strip_whitespace(a) for a in answers]
    if not strict_official or len(set(gts)) > 1:
        pred = normalize_vqa_answer(pred)
        gts = [normalize_vqa_answer(a) for a in gts]
    if len(gts) < 10:
        return float(pred in gts)
    n_match = gts.count(pred)
    accs = [min(1.0, (n_match - (gt == pred)) / 3.0) for gt in gts]
    return sum(accs) / len(accs)


# ---------------------------------------------------------------------------------------------------------
# Captioning (pycocoevalcap)
# ---------------------------------------------------------------------------------------------------------
TOKENIZER_PTB = "ptb"
TOKENIZER_FALLBACK = (
    "fallback-simple (java missing; numbers not comparable to published PTB-tokenized scores)"
)
TOKENIZER_SIMPLE = "simple (numbers not comparable to published PTB-tokenized scores)"


def _simple_tokenize(text: str) -> str:
    """Lower-case, replace every non-alphanumeric character by a space, collapse whitespace."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _dir_writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _ptb_jar() -> Path:
    from pycocoevalcap.tokenizer import ptbtokenizer

    return Path(ptbtokenizer.__file__).resolve().parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR


def _ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Tokenize ``{key: [caption, ...]}`` exactly as pycocoevalcap's ``PTBTokenizer`` does.

    ``PTBTokenizer.tokenize`` writes its input to a temp file *inside its package directory*
    (site-packages/pycocoevalcap/tokenizer) and runs ``java -cp stanford-corenlp-3.4.1.jar
    edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase <file>`` there. When that directory
    is writable we call the library; otherwise we run the same command on a file in the system temp dir
    and apply the same punctuation filter (identical output).

    Captions are whitespace-collapsed first: the library aligns output lines with inputs, and characters
    that Java treats as line breaks (``\\r``, ``\\u2028``, ...) would otherwise silently shift captions.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = _ptb_jar()
    if not jar.is_file():
        raise FileNotFoundError(f"Stanford CoreNLP jar not found: {jar}")
    clean = {k: [" ".join(c.split()) for c in caps] for k, caps in captions.items()}
    keys = [k for k, caps in clean.items() for _ in caps]
    if not keys:
        return {}
    if _dir_writable(jar.parent):
        out: dict[Hashable, list[str]] = ptbtokenizer.PTBTokenizer().tokenize(
            {k: [{"caption": c} for c in caps] for k, caps in clean.items()}
        )
    else:
        sentences = "\n".join(c for caps in clean.values() for c in caps)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "captions.txt"
            src.write_bytes(sentences.encode())
            cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines"]
            proc = subprocess.run([*cmd, "-lowerCase", str(src)], capture_output=True, check=True)
        lines = proc.stdout.decode().split("\n")
        if len(lines) < len(keys) or any(line.strip() for line in lines[len(keys) :]):
            raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(keys)} captions")
        out = {}
        for k, line in zip(keys, lines):
            words = [w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS]
            out.setdefault(k, []).append(" ".join(words))
    for k, caps in clean.items():
        if caps and len(out.get(k, [])) != len(caps):
            raise RuntimeError("PTBTokenizer output is misaligned with its input (did the JVM fail?)")
    return out


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    tokenizer: str = "ptb",
) -> dict[str, Any]:
    """Corpus-level COCO caption metrics via pycocoevalcap.

    Returns ``{"CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L": float, "tokenizer": str,
    "num_images": int}``. Scores are the raw pycocoevalcap values (BLEU/ROUGE-L in ``[0, 1]``, CIDEr-D on
    its ``~0-10`` scale); multiply by 100 for the usual paper numbers. CIDEr's IDF comes from the given
    references, so it needs a corpus of several images (a single image always scores 0).

    ``tokenizer="ptb"`` (default) uses the Stanford PTB tokenizer bundled with pycocoevalcap (needs
    ``java`` on PATH; one JVM start per call) -- the setting behind published COCO numbers. If ``java``
    or the jar is missing it falls back to a lower-case + strip-punctuation tokenizer, emits a warning and
    labels ``"tokenizer"`` accordingly. ``tokenizer="simple"`` selects that tokenizer explicitly.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not predictions:
        raise ValueError("caption_scores needs at least one prediction")
    ids = list(predictions)
    for i in ids:
        if isinstance(references[i], str) or len(references[i]) == 0:
            raise ValueError(f"references[{i!r}] must be a non-empty list of strings")

    if tokenizer == "simple":
        label = TOKENIZER_SIMPLE
    elif tokenizer == "ptb":
        label = TOKENIZER_PTB
        if shutil.which("java") is None or not _ptb_jar().is_file():
            label = TOKENIZER_FALLBACK
            warnings.warn(
                "caption_scores: Java (or the Stanford CoreNLP jar) is missing; using a simple tokenizer. "
                "CIDEr/BLEU will not be comparable to published PTB-tokenized scores.",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r} (expected 'ptb' or 'simple')")

    if label == TOKENIZER_PTB:
        # One JVM start: tokenize predictions and references together under tagged keys.
        joint: dict[Hashable, list[str]] = {("ref", i): list(references[i]) for i in ids}
        joint.update({("pred", i): [predictions[i]] for i in ids})
        tok = _ptb_tokenize(joint)
        gts = {i: tok[("ref", i)] for i in ids}
        res = {i: tok[("pred", i)] for i in ids}
    else:
        gts = {i: [_simple_tokenize(r) for r in references[i]] for i in ids}
        res = {i: [_simple_tokenize(predictions[i])] for i in ids}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    scores: dict[str, Any] = {"CIDEr": float(cider)}
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    scores["ROUGE-L"] = float(rouge)
    scores["tokenizer"] = label
    scores["num_images"] = len(ids)
    return scores


# ---------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------
def _check_pair(preds: Sequence[Any], golds: Sequence[Any]) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"preds ({len(preds)}) and golds ({len(golds)}) differ in length")
    if len(golds) == 0:
        raise ValueError("metric is undefined on zero examples")


def accuracy(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Fraction of positions where ``preds[i] == golds[i]``."""
    _check_pair(preds, golds)
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def macro_f1(
    preds: Sequence[Hashable], golds: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> float:
    """Unweighted mean of per-class F1.

    ``labels`` defaults to every label seen in ``golds`` or ``preds``. A class that is never predicted
    (or never correct) gets F1 = 0: per-class F1 is defined as 0 whenever precision + recall == 0 (0/0
    precision or recall counts as 0). Predictions of labels outside ``labels`` still count as misses.
    """
    _check_pair(preds, golds)
    classes = list(dict.fromkeys(labels if labels is not None else [*golds, *preds]))
    if not classes:
        raise ValueError("macro_f1 needs at least one label")
    tp: Counter[Hashable] = Counter()
    n_pred: Counter[Hashable] = Counter(preds)
    n_gold: Counter[Hashable] = Counter(golds)
    for p, g in zip(preds, golds):
        if p == g:
            tp[g] += 1
    f1s = []
    for c in classes:
        precision = tp[c] / n_pred[c] if n_pred[c] else 0.0
        recall = tp[c] / n_gold[c] if n_gold[c] else 0.0
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(f1s) / len(f1s)


# ---------------------------------------------------------------------------------------------------------
# Text overlap / span QA
# ---------------------------------------------------------------------------------------------------------
def rouge_l(prediction: str, reference: str | Sequence[str]) -> float:
    """Sentence ROUGE-L F-measure (beta = 1.2), via ``pycocoevalcap.rouge.rouge.Rouge``.

    Tokens are whitespace-separated and case-sensitive (tokenize / lower-case beforehand if needed).
    With several references, precision and recall are each maximized over references (as in
    pycocoevalcap). An empty prediction or reference scores 0 (1.0 if both are empty).
    """
    from pycocoevalcap.rouge.rouge import Rouge

    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("rouge_l needs at least one reference")
    pred = " ".join(prediction.split())
    refs = [" ".join(r.split()) for r in refs]
    if not pred or not any(refs):
        return float(not pred and not any(refs))
    return float(Rouge().calc_score([pred], [r for r in refs if r]))


_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_SQUAD_PUNCT = frozenset(string.punctuation)


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation to spaces (apostrophes kept: "don't"), single spaces: transcripts are
    compared on their words, as ASR is usually scored."""
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate (jiwer: substitutions + deletions + insertions over reference words) of
    normalised transcripts; 0 is perfect and it can exceed 1."""
    _check_pair(predictions, references)
    try:
        import jiwer
    except ImportError:
        raise ImportError("word error rate needs jiwer: pip install jiwer (the speech extra)") from None
    refs = [normalize_transcript(r) for r in references]
    if not all(refs):
        raise ValueError("a reference transcript is empty after normalisation")
    return float(jiwer.wer(refs, [normalize_transcript(p) for p in predictions]))


def normalize_squad_answer(text: str) -> str:
    """SQuAD normalization: lower-case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCT)
    return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


def _golds(gold: str | Sequence[str]) -> list[str]:
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("need at least one gold answer")
    return golds


def _squad_f1_single(prediction: str, gold: str) -> float:
    pred_toks = normalize_squad_answer(prediction).split()
    gold_toks = normalize_squad_answer(gold).split()
    if not pred_toks or not gold_toks:  # SQuAD v2.0 convention
        return float(pred_toks == gold_toks)
    n_same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_toks)
    recall = n_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """SQuAD token-level F1 after :func:`normalize_squad_answer`; max over several golds."""
    return max(_squad_f1_single(prediction, g) for g in _golds(gold))


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 if the SQuAD-normalized prediction equals any SQuAD-normalized gold, else 0.0."""
    pred = normalize_squad_answer(prediction)
    return float(any(pred == normalize_squad_answer(g) for g in _golds(gold)))
