"""M3D-Bench metrics, per sample, in NumPy and pure Python.

Two families sit side by side:
- the REFERENCE definitions (what the M3D Bench scripts compute, so published numbers can be compared):
  `bleu1`, `rouge1`, `meteor`, `bertscore_f1`, `closed_vqa_correct`, `box_iou_reference`, `soft_dice`;
- the STANDARD ones: `bleu4_corpus` (sacreBLEU's corpus BLEU), `rougeL`, `box_iou`, `dice`.

Text scores are fractions in [0, 1] (multiply by 100 to compare with the paper's tables); `retrieval_recall`
returns percentages, as the paper reports them.

Only `meteor` needs a third-party package (nltk); everything else is NumPy or the standard library.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# BLEU (13a tokenization, as mteval-v13a / sacreBLEU / HF `evaluate`'s "bleu")
# ---------------------------------------------------------------------------------------------------------------

# mteval-v13a splits off every ASCII punctuation mark except the apostrophe, and '.', ',', '-', which have
# digit-aware rules below (so "3.5" and "1,000" stay whole, and "well-defined" stays one token).
_13A_PUNCTUATION = re.compile("([" + re.escape("!\"#$%&()*+/:;<=>?@[\\]^_`{|}~") + "])")
_13A_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([.,])")
_13A_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([.,])([^0-9])")
_13A_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")


def tokenize_13a(text: str) -> list[str]:
    """mteval-v13a tokenization (sacreBLEU's default `13a`), without lowercasing."""
    text = text.rstrip()  # sacreBLEU strips trailing whitespace before tokenizing
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    text = _13A_PUNCTUATION.sub(r" \1 ", text)
    text = _13A_PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _13A_PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _13A_DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return text.split()


def _ngram_counts(tokens: Sequence[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def _bleu_statistics(hyp_tokens: Sequence[str], ref_tokens: Sequence[str], max_order: int):
    """(clipped matches per order, hypothesis n-grams per order) for one sentence pair."""
    hyp_counts = _ngram_counts(hyp_tokens, max_order)
    ref_counts = _ngram_counts(ref_tokens, max_order)
    matches = [0] * max_order
    totals = [0] * max_order
    for ngram, count in hyp_counts.items():
        totals[len(ngram) - 1] += count
        matches[len(ngram) - 1] += min(count, ref_counts[ngram])
    return matches, totals


def _bleu_from_statistics(matches: Sequence[int], totals: Sequence[int], hyp_len: int, ref_len: int,
                          smoothing: str) -> float:
    """BLEU in [0, 1] from summed statistics: brevity penalty x geometric mean of the n-gram precisions.

    `smoothing` is "none" (a zero precision gives 0) or "exp" (mteval's NIST smoothing: the k-th order with no
    match gets precision 1 / (2^k * total)). An order with no hypothesis n-grams at all gives 0 (sacreBLEU's
    behaviour without `effective_order`).
    """
    if not any(matches):
        return 0.0
    brevity_penalty = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    log_precision_sum = 0.0
    zero_match_orders = 0
    for matched, total in zip(matches, totals):
        if total == 0:
            return 0.0
        if matched == 0:
            if smoothing != "exp":
                return 0.0
            zero_match_orders += 1
            log_precision_sum += -math.log(2.0 ** zero_match_orders * total)
        else:
            log_precision_sum += math.log(matched / total)
    return brevity_penalty * math.exp(log_precision_sum / len(matches))


def bleu1(hyp: str, ref: str) -> float:
    """Sentence-level BLEU-1 as the M3D Bench reports "BLEU" (HF `evaluate` "bleu" with max_order=1).

    13a tokenization, case-sensitive, clipped unigram precision times the brevity penalty, no smoothing.
    An empty hypothesis scores 0 (the reference's implementation raises ZeroDivisionError there).
    """
    hyp_tokens, ref_tokens = tokenize_13a(hyp), tokenize_13a(ref)
    matches, totals = _bleu_statistics(hyp_tokens, ref_tokens, max_order=1)
    return _bleu_from_statistics(matches, totals, len(hyp_tokens), len(ref_tokens), smoothing="none")


def bleu4_corpus(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Standard corpus BLEU-4 in [0, 1], as `sacrebleu.corpus_bleu(hyps, [refs]).score / 100` with its defaults.

    One reference per hypothesis; statistics summed over the corpus; 13a tokenization, case-sensitive,
    'exp' smoothing, no effective order.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"bleu4_corpus: {len(hyps)} hypotheses but {len(refs)} references; pass one reference each.")
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, ref in zip(hyps, refs):
        hyp_tokens, ref_tokens = tokenize_13a(hyp), tokenize_13a(ref)
        pair_matches, pair_totals = _bleu_statistics(hyp_tokens, ref_tokens, max_order=4)
        matches = [a + b for a, b in zip(matches, pair_matches)]
        totals = [a + b for a, b in zip(totals, pair_totals)]
        hyp_len += len(hyp_tokens)
        ref_len += len(ref_tokens)
    return _bleu_from_statistics(matches, totals, hyp_len, ref_len, smoothing="exp")


# ---------------------------------------------------------------------------------------------------------------
# ROUGE (Google's rouge-score conventions, no stemmer)
# ---------------------------------------------------------------------------------------------------------------

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming: lowercase, every non-[a-z0-9] run becomes a space."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def _f_measure(precision: float, recall: float) -> float:
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge1(hyp: str, ref: str) -> float:
    """ROUGE-1 F-measure (clipped unigram overlap), the M3D Bench's "ROUGE"; 0 when either side has no token."""
    hyp_counts, ref_counts = Counter(rouge_tokenize(hyp)), Counter(rouge_tokenize(ref))
    if not hyp_counts or not ref_counts:
        return 0.0
    overlap = sum((hyp_counts & ref_counts).values())
    return _f_measure(overlap / sum(hyp_counts.values()), overlap / sum(ref_counts.values()))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            current.append(previous[j] + 1 if token_a == token_b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rougeL(hyp: str, ref: str) -> float:  # noqa: N802 (the metric's conventional name)
    """ROUGE-L F-measure (longest common subsequence, whole text as one sequence, no summary-level split)."""
    hyp_tokens, ref_tokens = rouge_tokenize(hyp), rouge_tokenize(ref)
    if not hyp_tokens or not ref_tokens:
        return 0.0
    lcs = _lcs_length(ref_tokens, hyp_tokens)
    return _f_measure(lcs / len(hyp_tokens), lcs / len(ref_tokens))


# ---------------------------------------------------------------------------------------------------------------
# METEOR (nltk, as HF `evaluate`'s "meteor")
# ---------------------------------------------------------------------------------------------------------------


class _NoSynonymWordNet:
    """A WordNet stand-in without synsets: nltk's METEOR synonym stage then adds no match (exact + stem only)."""

    def synsets(self, lemma: str, *args: Any, **kwargs: Any) -> list:
        return []


@functools.lru_cache(maxsize=None)
def _installed_wordnet() -> Any | None:
    """nltk's WordNet reader when nltk can find the corpus, else None (nltk cannot download it here)."""
    from nltk.corpus import wordnet

    try:
        wordnet.synsets("liver")
    except (LookupError, OSError):
        return None
    return wordnet


@functools.lru_cache(maxsize=None)
def _punkt_available() -> bool:
    from nltk.tokenize import sent_tokenize

    try:
        sent_tokenize("Probe sentence. Another one.")
    except LookupError:
        return False
    return True


def meteor_matchers() -> str:
    """Which METEOR matching stages `meteor` uses here, for evaluation reports."""
    if _installed_wordnet() is None:
        return "exact+stem (WordNet unavailable)"
    return "exact+stem+synonym"


def meteor_tokenizer() -> str:
    """Which tokenizer `meteor` uses here, for evaluation reports."""
    if _punkt_available():
        return "nltk word_tokenize (trained punkt)"
    return "nltk word_tokenize with an untrained punkt sentence splitter (punkt data unavailable)"


def meteor_tokenize(text: str) -> list[str]:
    """nltk's `word_tokenize`, as the reference tokenizes for METEOR.

    `word_tokenize` splits sentences with the trained English punkt model, then runs nltk's Treebank-style word
    tokenizer per sentence. When the punkt data is not installed (nltk cannot download it here), sentences are
    split by an untrained `PunktSentenceTokenizer` instead: the same algorithm without the learned abbreviation
    list, so a sentence-final period still becomes its own token; only rare abbreviation periods may differ.
    """
    from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer, word_tokenize

    if _punkt_available():
        return word_tokenize(text)
    word_tokenizer = NLTKWordTokenizer()
    return [token for sentence in PunktSentenceTokenizer().tokenize(text)
            for token in word_tokenizer.tokenize(sentence)]


def meteor(hyp: str, ref: str, *, wordnet: Any | None = None) -> float:
    """METEOR as the M3D Bench computes it: nltk's `single_meteor_score` on `meteor_tokenize`d text.

    alpha 0.9, beta 3, gamma 0.5, lowercased, Porter stemmer. `wordnet`: a reader with `synsets(word)`; None uses
    nltk's WordNet when installed, else a stand-in with no synonyms (see `meteor_matchers()`), which can only
    lower the score relative to the reference (synonym matches are missed).
    """
    from nltk.translate.meteor_score import single_meteor_score

    if wordnet is None:
        wordnet = _installed_wordnet() or _NoSynonymWordNet()
    return float(single_meteor_score(meteor_tokenize(ref), meteor_tokenize(hyp), wordnet=wordnet))


# ---------------------------------------------------------------------------------------------------------------
# BERTScore
# ---------------------------------------------------------------------------------------------------------------


def _greedy_match_f1(hyp_embeddings: np.ndarray, ref_embeddings: np.ndarray, weighted: slice) -> float:
    hyp = hyp_embeddings / np.linalg.norm(hyp_embeddings, axis=-1, keepdims=True)
    ref = ref_embeddings / np.linalg.norm(ref_embeddings, axis=-1, keepdims=True)
    cosine = hyp @ ref.T  # [n_hyp_tokens, n_ref_tokens]
    precision = cosine[weighted].max(axis=1).mean()  # each weighted hyp token against every ref token
    recall = cosine[:, weighted].max(axis=0).mean()
    return float(_f_measure(precision, recall))


def bertscore_f1(hyps: Sequence[str], refs: Sequence[str],
                 embed: Callable[[list[str]], list[np.ndarray]], *, specials_at_ends: bool = False) -> np.ndarray:
    """BERTScore F1 per pair: greedy cosine matching of contextual token embeddings, no idf, no rescaling.

    `embed(texts)` returns one [n_tokens, d] array per text. With `specials_at_ends=False` (the paper's form) the
    arrays hold content tokens only. With `specials_at_ends=True` they keep the model's first and last special
    tokens ([CLS]/[SEP], <s>/</s>); those are then match candidates but carry no weight, which is exactly what the
    `bert_score` package (the reference's BERTScore, via HF `evaluate`) computes. A text without content tokens
    scores 0. The reference uses roberta-large, layer 17 (bert_score's default for lang="en").
    """
    if len(hyps) != len(refs):
        raise ValueError(f"bertscore_f1: {len(hyps)} hypotheses but {len(refs)} references.")
    hyp_embeddings, ref_embeddings = embed(list(hyps)), embed(list(refs))
    n_special = 2 if specials_at_ends else 0
    weighted = slice(1, -1) if specials_at_ends else slice(None)
    scores = np.zeros(len(hyps), dtype=np.float64)
    for i, (hyp_emb, ref_emb) in enumerate(zip(hyp_embeddings, ref_embeddings)):
        hyp_emb, ref_emb = np.asarray(hyp_emb, np.float64), np.asarray(ref_emb, np.float64)
        if hyp_emb.shape[0] > n_special and ref_emb.shape[0] > n_special:
            scores[i] = _greedy_match_f1(hyp_emb, ref_emb, weighted)
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Closed VQA
# ---------------------------------------------------------------------------------------------------------------


def closed_vqa_correct(output: str, answer_choice: str) -> bool:
    """The reference's closed-VQA rule: correct iff "{answer_choice}." (e.g. "B.") occurs anywhere in the output."""
    return f"{answer_choice}." in output


# ---------------------------------------------------------------------------------------------------------------
# Boxes [d0, h0, w0, d1, h1, w1], normalised coordinates
# ---------------------------------------------------------------------------------------------------------------

_MARKED_BOX = re.compile(r"<bx_start>(.*?)<bx_end>", re.DOTALL)
_BRACKETED_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_box(text: str, *, require_markers: bool = False) -> np.ndarray | None:
    """The box in `<bx_start>[d0, h0, w0, d1, h1, w1]<bx_end>` as a float64 [6] array; None if it does not parse.

    Without the markers (decoding with skip_special_tokens drops them, as the reference does) the first
    bracketed list in the text is used, unless `require_markers`. None for a list that is not six finite numbers.
    """
    marked = _MARKED_BOX.search(text)
    if marked is not None:
        candidate = _BRACKETED_LIST.fullmatch(marked.group(1).strip())
    elif require_markers:
        return None
    else:
        candidate = _BRACKETED_LIST.search(text)
    if candidate is None:
        return None
    try:
        values = [float(item) for item in candidate.group(1).split(",")]
    except ValueError:
        return None
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def _box_extents(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != (6,) or gt.shape != (6,):
        raise ValueError(f"boxes must be [d0, h0, w0, d1, h1, w1], got shapes {pred.shape} and {gt.shape}")
    return pred[:3], pred[3:], gt[:3], gt[3:]


def box_iou_reference(pred: np.ndarray | None, gt: np.ndarray | None) -> float:
    """The reference's REC "IoU": intersection volume / (volume of the ENCLOSING box + 1e-6); -1 if a box is None.

    Not an IoU: the denominator is the smallest box containing both, so partial overlaps score lower than IoU.
    """
    if pred is None or gt is None:
        return -1.0
    pred_lo, pred_hi, gt_lo, gt_hi = _box_extents(pred, gt)
    intersection = np.prod(np.maximum(0.0, np.minimum(pred_hi, gt_hi) - np.maximum(pred_lo, gt_lo)))
    enclosing = np.prod(np.maximum(pred_hi, gt_hi) - np.minimum(pred_lo, gt_lo))
    return float(intersection / (enclosing + 1e-6))


def box_iou(pred: np.ndarray | None, gt: np.ndarray | None) -> float:
    """Standard 3D IoU (intersection / union of volumes); 0 when the prediction is None or both volumes are 0."""
    if pred is None or gt is None:
        return 0.0
    pred_lo, pred_hi, gt_lo, gt_hi = _box_extents(pred, gt)
    intersection = np.prod(np.maximum(0.0, np.minimum(pred_hi, gt_hi) - np.maximum(pred_lo, gt_lo)))
    union = np.prod(np.maximum(0.0, pred_hi - pred_lo)) + np.prod(np.maximum(0.0, gt_hi - gt_lo)) - intersection
    return float(intersection / union) if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Segmentation (one sample: logits and mask of the same shape, e.g. [1, 32, 256, 256])
# ---------------------------------------------------------------------------------------------------------------


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, np.float64)))  # no overflow for large |logits|


def _check_same_shape(logits: np.ndarray, mask: np.ndarray) -> None:
    if np.shape(logits) != np.shape(mask):
        raise ValueError(f"logits {np.shape(logits)} and mask {np.shape(mask)} must have the same shape")


def soft_dice(logits: np.ndarray, mask: np.ndarray, smooth: float = 1.0) -> float:
    """The reference's Dice (Bench `BinaryDice`): 2 sum(p m) / (sum(p) + sum(m) + smooth), p = sigmoid(logits).

    Over the whole volume, not thresholded. As in the reference code, `smooth` is in the denominator only, so a
    perfect prediction scores slightly below 1 and an empty mask scores ~0 whatever is predicted. Mask voxels
    equal to -1 (ignore label) count as background, as in the reference.
    """
    _check_same_shape(logits, mask)
    probabilities = _sigmoid(logits)
    target = (np.asarray(mask) > 0).astype(np.float64)
    return float(2.0 * np.sum(probabilities * target) / (np.sum(probabilities) + np.sum(target) + smooth))


def dice(logits: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """Standard Dice of the thresholded prediction sigmoid(logits) > threshold against mask > 0.

    Both empty (nothing predicted, nothing to find) counts as a perfect 1.0.
    """
    _check_same_shape(logits, mask)
    predicted = _sigmoid(logits) > threshold
    target = np.asarray(mask) > 0
    denominator = int(predicted.sum()) + int(target.sum())
    if denominator == 0:
        return 1.0
    return float(2.0 * np.logical_and(predicted, target).sum() / denominator)


def per_class_dice(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each class in each case, [B, num_classes], from class maps predicted and labels [B, *spatial];
    NaN where the case has none of that class in its labels (MONAI `DiceMetric`'s ignore_empty), so
    averages over cases skip them (np.nanmean)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"prediction shape {predicted.shape} != label shape {labels.shape}")
    flat_pred, flat_true = predicted.reshape(len(predicted), -1), labels.reshape(len(labels), -1)
    scores = np.full((len(predicted), num_classes), np.nan)
    for k in range(num_classes):
        pred_k, true_k = flat_pred == k, flat_true == k
        present = true_k.any(axis=1)
        both = np.logical_and(pred_k, true_k).sum(axis=1)
        scores[present, k] = 2.0 * both[present] / (pred_k.sum(axis=1) + true_k.sum(axis=1))[present]
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Image-text retrieval
# ---------------------------------------------------------------------------------------------------------------


def retrieval_recall(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in percent, both directions, for a square [N_images, N_texts] similarity where pair i matches i.

    "image_to_text_R@k": per image (row), is its text among the k best texts (the reference's "IR");
    "text_to_image_R@k": per text (column), likewise. Ties: a hit iff strictly fewer than k other candidates
    score higher than the match (the reference's `topk` breaks ties arbitrarily).
    """
    similarity = np.asarray(similarity, np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [N, N] with pair i matching i, got {similarity.shape}")
    matched = np.diagonal(similarity)
    texts_above = (similarity > matched[:, None]).sum(axis=1)  # per image: texts scoring above its own
    images_above = (similarity > matched[None, :]).sum(axis=0)  # per text: images scoring above its own
    recalls = {}
    for k in ks:
        recalls[f"image_to_text_R@{k}"] = float(100.0 * np.mean(texts_above < k))
        recalls[f"text_to_image_R@{k}"] = float(100.0 * np.mean(images_above < k))
    return recalls
