"""A deterministic synthetic data set in the M3D-Data layouts: NIfTI volumes of a body ellipsoid with
1–3 ellipsoid lesions of varied size, position and brightness, their masks, reports that describe them,
closed and open VQA about them (answerable from the image), Decathlon-style segmentation lists and
referring-segmentation rows; for Med3DInsight, cached "2D encoder" embeddings of slices in the three
planes (`slices.json`), a three-class label map (background, body, lesion; `labels.json`) and the side of
the largest lesion as a class (`classes.json`). It is the embedded default for tests and the demo."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from absl import logging

SIDES = ("left", "right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
VQA_COLUMNS = ("Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice")


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def make_case(rng: np.random.Generator, shape=(32, 64, 64)) -> dict:
    """One phantom: volume [D, H, W] float32, lesion masks, and the facts the texts are built from.

    Drawn so that every question about it has one visible answer: lesions do not touch (counts are the
    number of blobs), the largest is at least 1.3× the next in voxels and the brightest at least 0.15 above
    the next; cases that miss these are redrawn."""
    while True:
        case = _draw_case(rng, shape)
        if case is not None:
            return case


def _apart(a: dict, b: dict, margin: float = 2.0) -> bool:
    """The lesions' bounding boxes are separated by more than `margin` voxels along some axis."""
    return any(abs(ca - cb) > ra + rb + margin for ca, cb, ra, rb in zip(a["centre"], b["centre"], a["radii"], b["radii"]))


def _draw_case(rng: np.random.Generator, shape) -> dict | None:
    d, h, w = shape
    volume = np.zeros(shape, np.float32)
    body = _ellipsoid(shape, (d / 2, h / 2, w / 2), (d * 0.45, h * 0.42, w * 0.45))
    volume[body] = 0.25
    lesions = []
    for _ in range(int(rng.integers(1, 4))):
        side = SIDES[int(rng.integers(2))]
        centre = (rng.uniform(0.3, 0.7) * d, rng.uniform(0.3, 0.7) * h,
                  (rng.uniform(0.22, 0.4) if side == "left" else rng.uniform(0.6, 0.78)) * w)
        radii = tuple(rng.uniform(0.06, 0.14) * n for n in shape)
        if not all(_apart(dict(centre=centre, radii=radii), other) for other in lesions):
            return None
        region = _ellipsoid(shape, centre, radii) & body
        brightness = float(rng.uniform(0.5, 1.0))
        volume[region] = brightness
        lesions.append(dict(side=side, mask=region, size=int(region.sum()), brightness=brightness, centre=centre,
                            radii=radii))
    sizes = sorted((lesion["size"] for lesion in lesions), reverse=True)
    levels = sorted((lesion["brightness"] for lesion in lesions), reverse=True)
    if len(lesions) > 1 and (sizes[0] < 1.3 * sizes[1] or levels[0] < levels[1] + 0.15):
        return None
    volume += rng.normal(0, 0.01, shape).astype(np.float32) * body
    largest = max(lesions, key=lambda lesion: lesion["size"])
    brightest = max(lesions, key=lambda lesion: lesion["brightness"])
    sides = sorted({lesion["side"] for lesion in lesions})
    report = (f"There {'is' if len(lesions) == 1 else 'are'} {COUNT_WORDS[len(lesions)]} "
              f"lesion{'s' if len(lesions) > 1 else ''} in the body, on the {' and '.join(sides)} side. "
              f"The largest lesion is on the {largest['side']} side. The brightest lesion is on the "
              f"{brightest['side']} side.")
    return dict(volume=volume, lesions=lesions, largest=largest, brightest=brightest, report=report)


def _closed_question(question, answer, options, qtype):
    """A multiple-choice row with the options in their fixed order: the phantom tests whether the model
    reads the volume, not whether it can find a word among shuffled options."""
    letter = "ABCD"[options.index(answer)]
    return dict(zip(VQA_COLUMNS, ("", "", qtype, question, *options, answer, letter)))


PHANTOM_EMBEDDING_DIM = 64
SLICES_PER_PLANE = 8


def slice_embeddings(case: dict, projections: np.ndarray, rng: np.random.Generator,
                     per_plane: int = SLICES_PER_PLANE) -> dict[str, np.ndarray]:
    """Stand-ins for a frozen 2D CLIP's embeddings of `per_plane` evenly spaced slices per plane: the
    "image" embedding is a fixed random map of the slice's pixels (pooled to 8×8); the "text" one a fixed
    random map of what a caption would state (lesion area on each side, the brightest lesion level),
    plus noise, as generated text is. Positions are on the 256-slot grid (`SLICE_GRID`)."""
    from m3d_jax.data.insight_samples import SLICE_GRID  # here: keeps importing this module at 0.2 s, not 3.4

    volume = case["volume"]
    lesion_maps = {side: np.zeros(volume.shape, bool) for side in SIDES}
    brightness = np.zeros(volume.shape, np.float32)
    for lesion in case["lesions"]:
        lesion_maps[lesion["side"]] |= lesion["mask"]
        brightness[lesion["mask"]] = lesion["brightness"]
    rows = {"plane": [], "slice": [], "image_embedding": [], "text_embedding": []}
    for plane in range(3):
        length = volume.shape[plane]
        for position in np.linspace(0, length - 1, per_plane).round().astype(int):
            picture = np.take(volume, position, axis=plane)
            pooled = picture.reshape(8, picture.shape[0] // 8, 8, picture.shape[1] // 8).mean(axis=(1, 3))
            facts = [np.take(lesion_maps[side], position, axis=plane).mean() * 20 for side in SIDES]
            facts.append(np.take(brightness, position, axis=plane).max())
            rows["plane"].append(plane)
            rows["slice"].append(int((position + 0.5) * SLICE_GRID / length))
            rows["image_embedding"].append(pooled.reshape(-1) @ projections[0])
            rows["text_embedding"].append(np.asarray(facts) @ projections[1][: len(facts)]
                                          + rng.normal(0, 0.05, projections.shape[-1]))
    return {name: np.asarray(values, np.float32 if "embedding" in name else np.int64) for name, values in rows.items()}


def ensure_phantoms(data) -> bool:
    """Writes the phantom set to `data.root` when a data config asks for one (`phantom_cases`) and it is not
    there yet; returns whether it wrote."""
    cases = data.get("phantom_cases", 0)
    if not cases or (Path(data.root) / "cap.json").exists():
        return False
    logging.info("writing %d phantom cases to %s", cases, data.root)
    write_phantoms(data.root, num_cases=cases, seed=0)
    return True


def write_phantoms(root: str | Path, *, num_cases: int = 24, seed: int = 0, shape=(32, 64, 64)) -> Path:
    """Writes the phantom set under `root` (Cap JSON, VQA CSVs, Seg Decathlon JSON, RefSeg CSV, and
    Med3DInsight's slice embeddings, label maps and class list)."""
    import nibabel as nib

    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": [], "validation": [], "test": []}
    vqa_rows = {name: [] for name in splits}
    seg_items = {"training": [], "test": []}
    refseg_rows = []
    slice_lists = {name: [] for name in splits}
    label_items = {"training": [], "test": []}
    class_items = {"training": [], "test": []}
    # Separate RNGs, so the cases and texts are the same as without the slice embeddings.
    projections = np.random.default_rng(seed + 1).normal(0, 1, (2, 64, PHANTOM_EMBEDDING_DIM)).astype(np.float32)
    caption_noise = np.random.default_rng(seed + 2)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for index in range(num_cases):
        split = "train" if index < num_cases * 0.7 else "validation" if index < num_cases * 0.85 else "test"
        case = make_case(rng, shape)
        folder = root / "cases" / f"case_{index:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        # NIfTI stores (x, y, z) = (W, H, D).
        nib.save(nib.Nifti1Image(case["volume"].transpose(2, 1, 0), affine), folder / "image.nii.gz")
        union = np.zeros(shape, np.uint8)
        for lesion in case["lesions"]:
            union |= lesion["mask"].astype(np.uint8)
        nib.save(nib.Nifti1Image(union.transpose(2, 1, 0), affine), folder / "lesion_mask.nii.gz")
        (folder / "report.txt").write_text(case["report"])
        image, text = f"cases/case_{index:04d}/image.nii.gz", f"cases/case_{index:04d}/report.txt"
        splits[split].append({"image": image, "text": text})
        count = len(case["lesions"])
        for row in (
            _closed_question("How many lesions are there?", COUNT_WORDS[count], ("one", "two", "three", "four"), 4),
            _closed_question("On which side is the largest lesion?", case["largest"]["side"],
                             ("left", "right", "middle", "none"), 5),
            _closed_question("On which side is the brightest lesion?", case["brightest"]["side"],
                             ("left", "right", "middle", "none"), 5),
        ):
            row.update({"Image Path": image, "Text": case["report"]})
            vqa_rows[split].append(row)
        seg_split = "test" if split == "test" else "training"
        seg_items[seg_split].append({"image": image, "label": f"cases/case_{index:04d}/lesion_mask.nii.gz"})
        labels = np.where(union > 0, 2, (case["volume"] > 0.1).astype(np.uint8)).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), affine), folder / "labels.nii.gz")
        label_items[seg_split].append({"image": image, "label": f"cases/case_{index:04d}/labels.nii.gz"})
        class_items[seg_split].append({"image": image, "label": SIDES.index(case["largest"]["side"])})
        np.savez(folder / "slices.npz", **slice_embeddings(case, projections, caption_noise))
        slice_lists[split].append({"image": image, "slices": f"cases/case_{index:04d}/slices.npz"})
        refseg_rows.append({"Image": image, "Mask": f"cases/case_{index:04d}/lesion_mask.nii.gz", "Mask_ID": 1,
                            "Question_Type": 0, "Question": "Please segment every lesion in this scan.",
                            "Answer": "The lesions are at [SEG]."})
    for split, rows in vqa_rows.items():
        with open(root / f"vqa_{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=VQA_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    (root / "seg.json").write_text(json.dumps({"labels": {"0": "background", "1": "lesion"}, **seg_items}, indent=1))
    with open(root / "refseg.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(refseg_rows[0]))
        writer.writeheader()
        writer.writerows(refseg_rows)
    (root / "slices.json").write_text(json.dumps(slice_lists, indent=1))
    (root / "labels.json").write_text(json.dumps(
        {"labels": {"0": "background", "1": "body", "2": "lesion"}, **label_items}, indent=1))
    (root / "classes.json").write_text(json.dumps(
        {"labels": {str(i): f"largest lesion on the {side}" for i, side in enumerate(SIDES)}, **class_items},
        indent=1))
    (root / "cap.json").write_text(json.dumps(splits, indent=1))  # written last: marks a complete set
    return root


def phantom_tokenizer():
    """A word-level tokenizer (transformers `PreTrainedTokenizerFast`, built offline) covering every word
    the phantom texts and the prompt templates use, with <s>, </s>, <unk> (= pad) and LaMed's added tokens.
    It decodes punctuation without a space before it, so "B." survives the closed-VQA check."""
    import re

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # here, not at the top: these import jax and flax (see slice_embeddings)
    from m3d_jax.data import med2e3_samples, prompts
    from m3d_jax.tokenizer import add_lamed_tokens

    texts = [*prompts.CAPTION_PROMPTS, *prompts.SEGMENT_PROMPTS, *prompts.SEGMENT_ANSWERS, *prompts.REC_PROMPTS,
             *prompts.REG_PROMPTS, "Choices: A. B. C. D. It is the lesion lesions at middle none four",
             "How many lesions are there? On which side is the largest brightest lesion?",
             "Please segment every lesion in this scan. The lesions are at"]
    rng = np.random.default_rng(0)
    texts += [make_case(rng, (16, 16, 16))["report"] for _ in range(64)]
    split = lambda text: re.findall(r"\w+|[^\w\s]+", text.replace("[SEG]", " "))  # noqa: E731
    words = sorted({w for text in texts for w in split(text)})
    # Med-2E3's chat template, appended so the LaMed words keep their ids.
    words += sorted({w for w in split(med2e3_samples.SYSTEM + " USER: ASSISTANT:")} - set(words))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    add_lamed_tokens(tokenizer)
    return tokenizer
