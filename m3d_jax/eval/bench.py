"""M3D-Bench: the eight tasks run on a checkpoint, per-sample outputs and metrics with the reference
definitions and the standard ones side by side (REFERENCE §6).

Generation tasks (report, vqa_closed, vqa_open, rec, reg, seg, refseg) take an M3D-LaMed; a Med-2E3 runs
report, vqa_closed, vqa_open (what it is trained for) and rec, reg (no SegVol module), with its own chat
prompt and the question in BERT tokens steering the slice scores (the top slice is kept per sample);
retrieval takes an M3D-CLIP. Decoding is greedy (256 new tokens, seed 42), batched with left padding.
Prompts for rec / reg / seg are drawn from our templates with a fixed seed; report uses the first
caption prompt.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from m3d_jax.data import med2e3_samples, shards
from m3d_jax.data import prompts as lamed_prompts
from m3d_jax.data.clip_samples import text_ids
from m3d_jax.data.lamed_samples import record_texts
from m3d_jax.data.pipeline import SOURCES
from m3d_jax.data.prepared import prepare_record
from m3d_jax.data.prompts import CAPTION_PROMPTS
from m3d_jax.eval import metrics
from m3d_jax.eval.retrieval import encode_pairs
from m3d_jax.generate import PROMPT_BUCKET, SamplingConfig, left_pad
from m3d_jax.models.lamed import LamedGenerator
from m3d_jax.models.med2e3 import Med2E3, generate_med2e3

GENERATION_TASKS = ("report", "vqa_closed", "vqa_open", "rec", "reg", "seg", "refseg")
TASKS = ("retrieval", *GENERATION_TASKS)
TEXT_TASKS = ("report", "vqa_open", "reg")  # scored by BLEU / ROUGE / METEOR / BERTScore
MED2E3_TASKS = ("report", "vqa_closed", "vqa_open", "rec", "reg")
MED2E3_DEFAULT_TASKS = ("report", "vqa_closed", "vqa_open")  # what Med-2E3 is trained for
SOURCE_KIND = {"retrieval": "cap", "report": "cap", "vqa_closed": "vqa_closed", "vqa_open": "vqa_open",
               "rec": "rec", "reg": "reg", "seg": "seg", "refseg": "refseg"}


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 42
    window: tuple[float, float] | None = None


@dataclasses.dataclass
class TaskResult:
    task: str
    samples: list[dict[str, Any]]  # one JSON-able dict per sample
    metrics: dict[str, float]  # reference and standard metrics (percent)


def is_med2e3(model) -> bool:
    return isinstance(model, Med2E3)


def _vision(model):
    return model.config.vision3d.vision if is_med2e3(model) else model.config.vision


def in_channels(model) -> int:
    """The channels of the volumes the model takes."""
    return _vision(model).in_channels


def shard_records(root: str, entry: dict, model, window: tuple[float, float] | None = None):
    """A bench source's records from the prepared shard set at `root` (`tools/prepare_data.py`), volumes and
    masks prepared for `model`'s input (the set's preparation is checked against it)."""
    needed = shards.Settings(tuple(image_size(model)), window, in_channels(model))
    return shards.open_source(root, entry, SOURCES[entry["kind"]][1], needed)


def image_size(model) -> tuple[int, int, int]:
    """The volume size the model takes (D, H, W)."""
    return tuple(_vision(model).image_size)


def med2e3_question_length(config) -> int:
    """BERT tokens of a Med-2E3 question: the reference's 512, within the text encoder's positions
    (padding does not change the pooled output; truncation at 512 is the reference's)."""
    return min(512, config.vision3d.text.max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """The prompts of one batch of questions, left-padded, with the ids generation stops and pads with."""

    ids: np.ndarray  # [B, P] int32, P a multiple of the builder's `multiple`
    mask: np.ndarray  # [B, P] int32, 0 on the left padding
    pad_token_id: int
    eos_token_id: int
    question_ids: np.ndarray | None = None  # Med-2E3: the questions in BERT tokens [B, Q]
    question_mask: np.ndarray | None = None

    def sampling(self, base: SamplingConfig) -> SamplingConfig:
        """`base` (length, temperature, top-p, seed) stopping at this tokenizer's EOS, padding with its pad."""
        return dataclasses.replace(base, eos_token_ids=(self.eos_token_id,), pad_token_id=self.pad_token_id)


def lamed_prompt_batch(tokenizer, config, questions: Sequence[str], multiple: int = PROMPT_BUCKET) -> PromptBatch:
    """M3D-LaMed prompts as the model is trained on them (`prompts.prompt_ids`: BOS, `proj_out_num` image
    placeholders, the question), left-padded to a multiple of `multiple` tokens (one compiled generate per
    bucket of prompt lengths, across the batches of an evaluation). The one LaMed prompt
    builder: M3D-Bench here and `m3d_jax.inference` (tools/infer.py, the web app) use it."""
    prompts = [lamed_prompts.prompt_ids(tokenizer, q, proj_out_num=config.proj_out_num,
                                        image_token_id=config.image_token_id) for q in questions]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, multiple=multiple)
    return PromptBatch(ids, mask, tokenizer.pad_token_id, tokenizer.eos_token_id)


def med2e3_prompt_batch(tokenizers, config, questions: Sequence[str],
                        multiple: int = PROMPT_BUCKET) -> PromptBatch:
    """Med-2E3 prompts (its chat template around the visual placeholders), left-padded to a multiple of
    `multiple` tokens, and the questions in BERT tokens for the text-guided slice scores. `tokenizers` is a
    `Med2E3Tokenizers`. The one Med-2E3 prompt builder, shared as `lamed_prompt_batch` is."""
    llm = tokenizers.llm
    pad = llm.pad_token_id if llm.pad_token_id is not None else llm.eos_token_id
    prompts = [med2e3_samples.prompt_ids(llm, q, num_visual=config.num_visual_tokens,
                                         placeholder_id=config.image_token_id).ids for q in questions]
    ids, mask = left_pad(prompts, pad, multiple=multiple)
    encoded = [text_ids(tokenizers.text, q, med2e3_question_length(config)) for q in questions]
    return PromptBatch(ids, mask, pad, llm.eos_token_id, np.stack([e[0] for e in encoded]),
                       np.stack([e[1] for e in encoded]))


def _bench_sampling(settings: BenchSettings) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=settings.max_new_tokens, seed=settings.seed)


def generate_med2e3_answers(model, tokenizers, questions: Sequence[str], images: np.ndarray,
                            settings: BenchSettings) -> tuple[list[str], np.ndarray]:
    """Greedy Med-2E3 answers (special tokens removed) and slice scores [B, slices] for one batch.
    `tokenizers` is a `Med2E3Tokenizers` (the LLM's, and BERT's for the question)."""
    prompts = med2e3_prompt_batch(tokenizers, model.config, questions)
    out = generate_med2e3(model, images, prompts.ids, prompts.question_ids, prompts.question_mask,
                          attention_mask=prompts.mask, config=prompts.sampling(_bench_sampling(settings)))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = [tokenizers.llm.decode(tokens[row, : lengths[row]], skip_special_tokens=True).strip()
             for row in range(len(questions))]
    return texts, np.asarray(out.slice_scores)


def lamed_answers(model, tokenizer, settings: BenchSettings) -> Callable:
    """`start(questions, images)` for a loop over batches with one LaMed: dispatches a batch's greedy
    generation and returns `finish()`, which waits for it and gives the answers (text with special tokens
    removed) and the SegVol logits (or None). Reading a batch's answers after dispatching the next one keeps
    the host's work (prompts, detokenising, scoring) off the generation's critical path."""
    generator = LamedGenerator(model)

    def start(questions: Sequence[str], images: np.ndarray) -> Callable[[], tuple[list[str], np.ndarray | None]]:
        prompts = lamed_prompt_batch(tokenizer, model.config, questions)
        out = generator(images, prompts.ids, attention_mask=prompts.mask,
                        config=prompts.sampling(_bench_sampling(settings)))

        def finish():
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            texts = [tokenizer.decode(tokens[row, : lengths[row]], skip_special_tokens=True).strip()
                     for row in range(len(questions))]
            return texts, (np.asarray(out.seg_logits) if out.seg_logits is not None else None)

        return finish

    return start


def run_generation_task(task: str, model, tokenizer, records: Sequence[dict], settings: BenchSettings,
                        embed: Callable | None = None, answer: Callable | None = None) -> TaskResult:
    """Answers every record of a generation task with a LaMed or a Med-2E3 (then `tokenizer` is its
    `Med2E3Tokenizers`) and scores the answers. `records`: raw records, or a prepared shard source
    (`data.shards.open_source`) whose volumes and masks come prepared. The next batch's volumes are read and
    prepared on reader threads (one per core) while the model answers the current one, and a LaMed's
    answers to a batch are read after the next batch is dispatched.
    `answer(questions, images) -> finish`, with `finish() -> (texts, seg_logits or None)`, replaces the
    LaMed's own answering (the evaluation bench runs the PyTorch model through this loop)."""

    med2e3 = is_med2e3(model)
    if med2e3 and task not in MED2E3_TASKS:
        raise ValueError(f"a Med-2E3 cannot run {task}; it runs {', '.join(MED2E3_TASKS)}")
    if med2e3:
        if answer is not None:
            raise ValueError("answer= replaces a LaMed's answering; a Med-2E3 answers through its own loop")

        def answer(questions, images):
            result = generate_med2e3_answers(model, tokenizer, questions, images, settings)
            return lambda: result
    elif answer is None:
        answer = lamed_answers(model, tokenizer, settings)
    size, channels = image_size(model), in_channels(model)

    def read_batch(begin: int):  # the volumes of a batch, each read and prepared on a reader thread
        chunk = [records[i] for i in range(begin, min(begin + settings.batch_size, len(records)))]
        rows = len(chunk)
        chunk += chunk[-1:] * (settings.batch_size - rows)  # one compiled shape; padding rows are dropped
        return rows, chunk, [readers.submit(prepare_record, r, size, settings.window, channels) for r in chunk]

    samples: list[dict[str, Any]] = []

    def record(rows, chunk, prepared, questions, pairs, finish):
        texts, outputs = finish()  # Med-2E3: slice scores; LaMed: SegVol logits or None
        for row in range(rows):
            sample = {"image": chunk[row]["image"], "question": questions[row], "reference": pairs[row][1],
                      "output": texts[row]}
            if med2e3:  # the slice of the model's input (depth index) that TG-IS weighted most
                sample["top_slice"] = int(outputs[row].argmax())
                sample["top_slice_score"] = float(outputs[row].max())
            if task == "vqa_closed":
                sample["answer_choice"] = chunk[row]["choice"]
            if task in ("seg", "refseg"):
                logits = outputs[row] if outputs is not None else np.full(prepared[row][1].shape, -np.inf)
                sample["soft_dice"] = metrics.soft_dice(logits, prepared[row][1])
                sample["dice"] = metrics.dice(logits, prepared[row][1])
            samples.append(sample)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as readers:
        pending = read_batch(0) if records else None
        in_flight = None
        for begin in range(0, len(records), settings.batch_size):
            rows, chunk, futures = pending
            prepared = [future.result() for future in futures]
            if begin + settings.batch_size < len(records):
                pending = read_batch(begin + settings.batch_size)
            pairs = [record_texts(r, mask, np.random.default_rng([settings.seed, begin + i]))
                     for i, (r, (_, mask)) in enumerate(zip(chunk, prepared))]
            questions = [CAPTION_PROMPTS[0] if task == "report" else q for q, _ in pairs]
            finish = answer(questions, np.stack([p[0] for p in prepared]))
            if in_flight is not None:
                record(*in_flight)
            in_flight = (rows, chunk, prepared, questions, pairs, finish)
        if in_flight is not None:
            record(*in_flight)
    return TaskResult(task, samples, score(task, samples, embed))


def score(task: str, samples: list[dict[str, Any]], embed: Callable | None = None) -> dict[str, float]:
    """The task's metrics over its samples, in percent. Adds per-sample scores to `samples` in place."""
    if task == "vqa_closed":
        for s in samples:
            s["correct"] = metrics.closed_vqa_correct(s["output"], s["answer_choice"])
        return {"accuracy": 100 * float(np.mean([s["correct"] for s in samples]))}
    if task == "rec":
        for s in samples:
            predicted, truth = metrics.parse_box(s["output"]), metrics.parse_box(s["reference"])
            s["iou_enclosing"] = metrics.box_iou_reference(predicted, truth)
            s["iou"] = metrics.box_iou(predicted, truth)
        return {"iou_reference": 100 * float(np.mean([s["iou_enclosing"] for s in samples])),
                "iou": 100 * float(np.mean([s["iou"] for s in samples])),
                "unparsed": float(sum(s["iou_enclosing"] == -1 for s in samples))}
    if task in ("seg", "refseg"):
        return {"soft_dice_reference": 100 * float(np.mean([s["soft_dice"] for s in samples])),
                "dice": 100 * float(np.mean([s["dice"] for s in samples]))}
    hyps, refs = [s["output"] for s in samples], [s["reference"] for s in samples]
    for s in samples:
        s.update(bleu1=metrics.bleu1(s["output"], s["reference"]), rouge1=metrics.rouge1(s["output"], s["reference"]),
                 meteor=metrics.meteor(s["output"], s["reference"]), rougeL=metrics.rougeL(s["output"], s["reference"]))
    result = {name: 100 * float(np.mean([s[key] for s in samples]))
              for name, key in (("bleu1", "bleu1"), ("rouge1", "rouge1"), ("meteor", "meteor"), ("rougeL", "rougeL"))}
    if embed is not None:
        f1 = metrics.bertscore_f1(hyps, refs, embed, specials_at_ends=True)
        for s, value in zip(samples, f1):
            s["bertscore_f1"] = float(value)
        result["bertscore_f1"] = 100 * float(np.mean(f1))
    result["bleu4_corpus"] = 100 * metrics.bleu4_corpus(hyps, refs)
    return result


def run_retrieval(model, tokenizer, records: Sequence[dict], settings: BenchSettings) -> TaskResult:
    """Image ↔ report retrieval over the records with an M3D-CLIP."""
    images, texts = encode_pairs(model, tokenizer, records, batch_size=settings.batch_size, window=settings.window,
                                 seed=settings.seed)
    similarity = images @ texts.T
    ranks = [int((similarity[i] > similarity[i, i]).sum()) for i in range(len(records))]
    samples = [{"image": r["image"], "text_rank_of_pair": rank} for r, rank in zip(records, ranks)]
    return TaskResult("retrieval", samples, metrics.retrieval_recall(similarity))


# Metric labels for the Markdown table: (key, label); "ref" marks the reference definitions.
LABELS = {
    "accuracy": "Accuracy (ref)", "iou_reference": "IoU over enclosing box (ref)", "iou": "IoU",
    "unparsed": "unparsed boxes", "soft_dice_reference": "soft Dice (ref)", "dice": "Dice@0.5",
    "bleu1": "BLEU-1 (ref)", "rouge1": "ROUGE-1 (ref)", "meteor": "METEOR (ref)", "bertscore_f1": "BERTScore F1",
    "rougeL": "ROUGE-L", "bleu4_corpus": "BLEU-4 (corpus)",
}


def markdown_table(results: Sequence[TaskResult], notes: Sequence[str] = ()) -> str:
    """One row per task, like the paper's tables; values in percent."""
    lines = ["| Task | Samples | Metrics |", "|---|---:|---|"]
    for result in results:
        cells = ", ".join(f"{LABELS.get(key, key)} {value:.2f}" for key, value in result.metrics.items())
        lines.append(f"| {result.task} | {len(result.samples)} | {cells} |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"
