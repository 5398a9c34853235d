"""Grain random-access sources over the M3D-Data layouts. Records are light (paths and strings; Cap's
report texts are read when the source is built); volumes and masks are opened by the transform, in the
reader threads or workers. Malformed lists fail with the file and row named."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from m3d_jax.data.volume import VolumeError


class _ListSource:
    """A list of record dicts with the grain RandomAccessDataSource protocol (len, getitem, picklable)."""

    def __init__(self, records: list[dict], description: str):
        self.records = records
        self.description = description

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self.records)} records)"


def _resolve(root: Path, relative: str, where: str) -> str:
    path = root / relative
    if not relative or not (path.is_file() or path.is_dir()):  # a folder is a DICOM series
        raise VolumeError(f"{where}: file {relative!r} not found under {root}")
    return str(path)


def _read_csv(csv_path: Path) -> list[dict]:
    try:
        with open(csv_path, newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError as err:
        raise VolumeError(f"{csv_path}: cannot read ({err})") from None


def _require(row: dict, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if not (row.get(c) or "").strip()]
    if missing:
        raise VolumeError(f"{where}: empty or missing columns {missing}")


def _read_list(list_path: Path, split: str, fields: tuple[str, ...]) -> tuple[dict, list[tuple[str, dict]]]:
    """A JSON list file and its `split` entries as (where, entry), each checked to hold `fields`."""
    try:
        data = json.loads(list_path.read_text())
        entries = data[split]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise VolumeError(f"{list_path}: cannot read split {split!r} ({type(err).__name__}: {err})") from None
    checked = []
    for row, entry in enumerate(entries):
        where = f"{list_path} [{split}][{row}]"
        if not isinstance(entry, dict) or any(field not in entry for field in fields):
            expected = ", ".join(f"'{field}': ..." for field in fields)
            raise VolumeError(f"{where}: expected {{{expected}}}, got {entry!r:.100}")
        checked.append((where, entry))
    return data, checked


class CaptionSource(_ListSource):
    """M3D-Cap: JSON {"train"|"validation"|"test": [{"image": rel, "text": rel .txt}]} → image + report."""

    def __init__(self, list_path: str | os.PathLike, split: str = "train", root: str | os.PathLike | None = None):
        list_path = Path(list_path)
        root = Path(root) if root is not None else list_path.parent
        records = []
        for where, entry in _read_list(list_path, split, ("image", "text"))[1]:
            text = Path(_resolve(root, entry["text"], where)).read_text().strip()
            records.append({"task": "caption", "image": _resolve(root, entry["image"], where), "answer": text})
        super().__init__(records, f"{list_path}:{split}")


class VQASource(_ListSource):
    """M3D-VQA CSV. closed=True: "Q Choices: A. .. B. .. C. .. D. .." answered "X. answer"; else the raw
    answer."""

    COLUMNS = ("Image Path", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "Answer Choice")

    def __init__(self, csv_path: str | os.PathLike, closed: bool = True, root: str | os.PathLike | None = None):
        csv_path = Path(csv_path)
        root = Path(root) if root is not None else csv_path.parent
        records = []
        for number, row in enumerate(_read_csv(csv_path), start=2):  # line 1 is the header
            where = f"{csv_path} line {number}"
            _require(row, self.COLUMNS, where)
            if closed:
                letter = row["Answer Choice"].strip()
                if letter not in "ABCD" or len(letter) != 1:
                    raise VolumeError(f"{where}: Answer Choice {letter!r} is not one of A, B, C, D")
                options = " ".join(f"{c}. {row[f'Choice {c}'].strip()}" for c in "ABCD")
                question, answer = f"{row['Question'].strip()} Choices: {options}", f"{letter}. {row['Answer'].strip()}"
            else:
                question, answer = row["Question"].strip(), row["Answer"].strip()
            records.append({"task": "vqa_closed" if closed else "vqa_open",
                            "image": _resolve(root, row["Image Path"].strip(), where),
                            "question": question, "answer": answer, "choice": row["Answer Choice"].strip()})
        super().__init__(records, f"{csv_path}:{'closed' if closed else 'open'}")


class SegSource(_ListSource):
    """M3D-Seg / Decathlon JSON {"labels": {"1": name, ...}, "training"|"test": [{"image", "label"}]}, one
    record per case and class. "label" is a label map (value = class id) or a folder of M3D's per-class
    masks mask_{k}.npy (k = the class's position in the label list without background).

    task: "seg" (answer with [SEG]), "rec" (answer with the box) or "reg" (question with the box)."""

    def __init__(self, list_path: str | os.PathLike, split: str = "training", task: str = "seg",
                 root: str | os.PathLike | None = None):
        if task not in ("seg", "rec", "reg"):
            raise ValueError(f"task must be seg, rec or reg, got {task!r}")
        list_path = Path(list_path)
        root = Path(root) if root is not None else list_path.parent
        data, entries = _read_list(list_path, split, ("image", "label"))
        try:
            labels = {int(k): v for k, v in data["labels"].items() if int(k) != 0}
        except (KeyError, ValueError, AttributeError) as err:
            raise VolumeError(f"{list_path}: cannot read the labels ({type(err).__name__}: {err})") from None
        records = []
        for where, entry in entries:
            image = _resolve(root, entry["image"], where)
            label = root / entry["label"]
            for position, (class_id, name) in enumerate(sorted(labels.items())):
                if label.is_dir():
                    mask, value = _resolve(label, f"mask_{position}.npy", where), None
                else:
                    mask, value = _resolve(root, entry["label"], where), class_id
                records.append({"task": task, "image": image, "mask": mask, "mask_value": value, "target": name})
        super().__init__(records, f"{list_path}:{split}:{task}")


class RefSegSource(_ListSource):
    """M3D-RefSeg CSV (Image, Mask, Mask_ID, Question_Type, Question, Answer): the mask is Mask == Mask_ID."""

    COLUMNS = ("Image", "Mask", "Mask_ID", "Question", "Answer")

    def __init__(self, csv_path: str | os.PathLike, root: str | os.PathLike | None = None):
        csv_path = Path(csv_path)
        root = Path(root) if root is not None else csv_path.parent
        records = []
        for number, row in enumerate(_read_csv(csv_path), start=2):
            where = f"{csv_path} line {number}"
            _require(row, self.COLUMNS, where)
            try:
                value = int(float(row["Mask_ID"]))
            except ValueError:
                raise VolumeError(f"{where}: Mask_ID {row['Mask_ID']!r} is not an integer") from None
            records.append({"task": "refseg", "image": _resolve(root, row["Image"].strip(), where),
                            "mask": _resolve(root, row["Mask"].strip(), where), "mask_value": value,
                            "question": row["Question"].strip(), "answer": row["Answer"].strip()})
        super().__init__(records, str(csv_path))


SLICE_ARRAYS = ("plane", "slice", "image_embedding", "text_embedding")


class SliceEmbeddingSource(_ListSource):
    """Med3DInsight's slice records: JSON {"train"|...: [{"image": volume, "slices": .npz}]}, one record per
    row of each volume's .npz (plane int [N]: 0 Axial, 1 Coronal, 2 Sagittal; slice int [N] on the
    reference's 256-position grid; image_embedding and text_embedding float [N, E], cached from the frozen
    2D encoder by tools/slice_embeddings.py). The .npz files are checked here and read row by row later."""

    def __init__(self, list_path: str | os.PathLike, split: str = "train", root: str | os.PathLike | None = None):
        import numpy as np

        list_path = Path(list_path)
        root = Path(root) if root is not None else list_path.parent
        records = []
        for where, entry in _read_list(list_path, split, ("image", "slices"))[1]:
            image, slices = _resolve(root, entry["image"], where), _resolve(root, entry["slices"], where)
            try:
                with np.load(slices) as arrays:
                    missing = [name for name in SLICE_ARRAYS if name not in arrays.files]
                    if missing:
                        raise VolumeError(f"{where}: {slices} lacks the arrays {missing}")
                    plane, position = arrays["plane"], arrays["slice"]
                    rows = {name: arrays[name].shape[0] for name in SLICE_ARRAYS}
                    dims = {arrays["image_embedding"].shape[1:], arrays["text_embedding"].shape[1:]}
            except (OSError, ValueError) as err:
                if isinstance(err, VolumeError):
                    raise
                raise VolumeError(f"{where}: cannot read {slices} ({type(err).__name__}: {err})") from None
            if len(set(rows.values())) != 1 or len(dims) != 1 or len(next(iter(dims))) != 1:
                raise VolumeError(f"{where}: {slices} arrays disagree: rows {rows}, embedding shapes {sorted(dims)}")
            records += [{"task": "insight", "image": image, "slices": slices, "row": row, "plane": int(p),
                         "slice": int(s)} for row, (p, s) in enumerate(zip(plane, position))]
        super().__init__(records, f"{list_path}:{split}")


class LabelMapSource(_ListSource):
    """Decathlon-style segmentation: JSON {"labels": {"0": "background", "1": name, ...}, "training"|"test":
    [{"image", "label"}]} with one label map per case (voxel value = class id), one record per case."""

    def __init__(self, list_path: str | os.PathLike, split: str = "training", root: str | os.PathLike | None = None):
        list_path = Path(list_path)
        root = Path(root) if root is not None else list_path.parent
        data, entries = _read_list(list_path, split, ("image", "label"))
        self.class_names = _class_names(data, list_path)
        records = [{"task": "segment", "image": _resolve(root, entry["image"], where),
                    "mask": _resolve(root, entry["label"], where)} for where, entry in entries]
        super().__init__(records, f"{list_path}:{split}")


class ClassLabelSource(_ListSource):
    """Volume classification: JSON {"labels": {"0": name, ...}, "training"|"test": [{"image", "label": id}]}."""

    def __init__(self, list_path: str | os.PathLike, split: str = "training", root: str | os.PathLike | None = None):
        list_path = Path(list_path)
        root = Path(root) if root is not None else list_path.parent
        data, entries = _read_list(list_path, split, ("image", "label"))
        self.class_names = _class_names(data, list_path)
        records = []
        for where, entry in entries:
            label = entry["label"]
            if not isinstance(label, int) or not 0 <= label < len(self.class_names):
                raise VolumeError(f"{where}: label {label!r} is not a class id in 0..{len(self.class_names) - 1}")
            records.append({"task": "classify", "image": _resolve(root, entry["image"], where), "label": label})
        super().__init__(records, f"{list_path}:{split}")


def _class_names(data: dict, list_path: Path) -> list[str]:
    """The "labels" table as a list indexed by class id; ids must be 0..K−1."""
    try:
        labels = {int(k): str(v) for k, v in data["labels"].items()}
    except (KeyError, ValueError, AttributeError) as err:
        raise VolumeError(f"{list_path}: cannot read the labels ({type(err).__name__}: {err})") from None
    if sorted(labels) != list(range(len(labels))):
        raise VolumeError(f"{list_path}: label ids {sorted(labels)} are not 0..{len(labels) - 1}")
    return [labels[i] for i in range(len(labels))]
