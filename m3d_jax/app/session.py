"""The web app without the web: one model served to many browser sessions, each with its own upload folder,
volume and chat history; uploads checked before anything is read (format, size, zip entries) and every
problem turned into a one-line message for the page. Plain Python, tested without a browser."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from m3d_jax.data.sources import VQASource
from m3d_jax.data.volume import Volume, load_volume
from m3d_jax.errors import InputError, first_line
from m3d_jax.inference import Answer, Answerer, Prepared

MAX_UPLOAD_BYTES = 2 * 2**30
"""The largest upload (one file, or a zip before and after unpacking): 2 GiB, past a 512 × 512 × 2000 CT."""
MAX_VOXELS = 2**29
"""The most voxels a served volume may have: 512 Mi (2 GiB as float32), so one request cannot exhaust memory."""
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
WARM_UP_QUESTION = "What is shown in this scan?"


class UploadError(InputError):
    """An upload the app cannot serve; the message names the file as the user called it and says why."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_bytes: int = MAX_UPLOAD_BYTES
    max_voxels: int = MAX_VOXELS


def _suffix_ok(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES)


def _check_bytes(name: str, size: int, limits: Limits, what: str = "") -> None:
    if size > limits.max_bytes:
        raise UploadError(f"{name}: {size:,} bytes{what}, over the limit of {limits.max_bytes:,} bytes")


def extract_zip(path: Path, dest: Path, limits: Limits, name: str) -> Path:
    """Unpacks the zip at `path` into `dest`, refusing entries with absolute paths, `..` or links and
    archives whose unpacked size is over the limit; returns the folder holding the volume (the one folder
    with files, or `dest`)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UploadError(f"{name}: not a readable zip archive ({first_line(error)})") from None
    with archive:
        entries = [entry for entry in archive.infolist() if not entry.is_dir()]
        for entry in entries:
            parts = PurePosixPath(entry.filename.replace("\\", "/"))
            if parts.is_absolute() or ".." in parts.parts or (parts.parts and ":" in parts.parts[0]):
                raise UploadError(f"{name}: zip entry {entry.filename!r} points outside the archive; refused")
            if (entry.external_attr >> 16) & 0o170000 == 0o120000:
                raise UploadError(f"{name}: zip entry {entry.filename!r} is a symbolic link; refused")
        _check_bytes(name, sum(entry.file_size for entry in entries), limits, " unpacked")
        if not entries:
            raise UploadError(f"{name}: the zip archive is empty")
        try:
            for entry in entries:
                target = dest / entry.filename.replace("\\", "/")
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(entry) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise UploadError(f"{name}: cannot unpack the zip archive ({first_line(error)})") from None
    folders = {p.parent for p in dest.rglob("*") if p.is_file()}
    return folders.pop() if len(folders) == 1 else dest


def load_upload(paths: Sequence[str | Path], folder: Path, limits: Limits = Limits(),
                names: Sequence[str] | None = None) -> Volume:
    """The volume in an upload: one `.nii` / `.nii.gz` / `.npy` file, a `.zip` of a DICOM series (or of one
    volume file), or several files of one DICOM series (among several files, the last volume or zip file if
    there is one: the upload box keeps earlier files). Each file is copied into `folder` (a fresh folder the
    app owns) and only read there; `names` are the files as the user called them, for messages. Anything
    else is an `UploadError` saying what is wrong."""
    paths = [Path(p) for p in paths]
    names = list(names) if names is not None else [p.name for p in paths]
    if not paths:
        raise UploadError("no file uploaded")
    for path, name in zip(paths, names):
        if not path.is_file():
            raise UploadError(f"{name}: not a file")
        _check_bytes(name, path.stat().st_size, limits)
    _check_bytes(", ".join(names), sum(p.stat().st_size for p in paths), limits, " together")
    folder.mkdir(parents=True, exist_ok=True)
    whole = [i for i, name in enumerate(names) if _suffix_ok(name) or name.lower().endswith(".zip")]
    if len(paths) > 1 and whole:  # a file added to the upload box next to earlier ones: the newest volume
        paths, names = [paths[whole[-1]]], [names[whole[-1]]]
    if len(paths) > 1:  # the files of one DICOM series
        series = folder / "series"
        series.mkdir()
        for index, path in enumerate(paths):
            shutil.copyfile(path, series / f"{index:05d}_{Path(names[index]).name}")
        return _read(series, ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""), limits)
    path, name = paths[0], names[0]
    if name.lower().endswith(".zip"):
        unpacked = folder / "unpacked"
        unpacked.mkdir()
        where = extract_zip(path, unpacked, limits, name)
        files = [p for p in where.iterdir() if p.is_file()]
        if len(files) == 1 and _suffix_ok(files[0].name):
            return _read(files[0], f"{name}:{files[0].name}", limits)
        return _read(where, name, limits)
    if not _suffix_ok(name):
        raise UploadError(f"{name}: not a volume the app reads; upload a .nii, .nii.gz or .npy file, or a "
                          ".zip of a DICOM series")
    copy = folder / ("volume" + next(s for s in (".nii.gz", ".nii", ".npy") if name.lower().endswith(s)))
    shutil.copyfile(path, copy)
    return _read(copy, name, limits)


def _read(path: Path, name: str, limits: Limits) -> Volume:
    """`load_volume` with the app's voxel cap; its messages name the upload, not the server's copy."""
    try:
        volume = load_volume(path, max_voxels=limits.max_voxels)
    except InputError as error:
        message = str(error).replace(f"{path}/", f"{name}: ").replace(str(path), name)
        if "; if the volume is real" in message:  # the advice on raising the cap is for the CLI
            message = message.split("; if the volume is real")[0] + " voxels that this app serves"

        if "DICOM" not in message and path.is_dir():
            message = f"{name}: no DICOM series found ({message.removeprefix(name + ': ')})"
        raise UploadError(message) from None
    except (OSError, ValueError, MemoryError) as error:  # a reader library failing on a file it does not expect
        raise UploadError(f"{name}: cannot read the volume ({first_line(error)})") from None
    return dataclasses.replace(volume, path=Path(name))


@dataclasses.dataclass
class Session:
    """One browser session: its upload folder, its volume and the chat so far."""

    folder: Path
    prepared: Prepared | None = None
    history: list[Answer] = dataclasses.field(default_factory=list)
    uploads: int = 0
    stops: int = 0  # Stop presses: an answer whose question was asked before the latest one is dropped

    @property
    def volume(self) -> Volume | None:
        return None if self.prepared is None else self.prepared.volume

    @property
    def last(self) -> Answer | None:
        return self.history[-1] if self.history else None

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Service:
    """The model, loaded once and warmed up, shared by every session; `lock` serialises the model."""

    def __init__(self, answerer: Answerer, limits: Limits = Limits(), root: Path | None = None):
        self.answerer, self.limits = answerer, limits
        self._temporary = None if root is not None else tempfile.TemporaryDirectory(prefix="m3d_jax_app_")
        self.root = Path(root) if root is not None else Path(self._temporary.name)
        self.lock = threading.Lock()
        self._count = 0

    def new_session(self) -> Session:
        with self.lock:
            self._count += 1
            folder = self.root / f"session_{self._count:06d}"
        folder.mkdir(parents=True)
        return Session(folder)

    def warm_up(self, sampling=None) -> float:
        """Answers a question about a blank volume (compiling the generate path); returns the seconds taken."""
        shape = (self.answerer.vision.in_channels, *self.answerer.vision.image_size)
        blank = Volume(np.zeros(shape, np.float32), None, Path("warm-up"))
        return self.answerer.answer(self.answerer.prepare(blank), WARM_UP_QUESTION, sampling).seconds

    def load(self, session: Session, paths: Sequence[str | Path], names: Sequence[str] | None = None) -> Volume:
        """Reads an upload in a fresh folder of `session` and prepares it for the model; the chat restarts.
        The upload's files are removed once read (the volume is then in memory)."""
        session.uploads += 1
        folder = session.folder / f"upload_{session.uploads:04d}"
        try:
            volume = load_upload(paths, folder, self.limits, names)
            try:
                prepared = self.answerer.prepare(volume)
            except InputError as error:
                raise UploadError(str(error)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        session.prepared, session.history = prepared, []
        return volume

    def ask(self, session: Session, question: str, sampling=None) -> Answer:
        """The model's answer about the session's volume, added to its history."""
        if session.prepared is None:
            raise InputError("load a volume first (upload one, or click an example)")
        if not question.strip():
            raise InputError("type a question first")
        stops = session.stops
        with self.lock:
            answer = self.answerer.answer(session.prepared, question.strip(), sampling)
        if session.stops != stops:  # Stop was pressed while it ran (a jitted generate cannot be interrupted)
            raise InputError("stopped: the answer was discarded")
        session.history.append(answer)
        return answer

    def stop(self, session: Session | None) -> None:
        """Drops the answer `session` is waiting for, if any (Gradio takes a queued request off the queue)."""
        if session is not None:
            session.stops += 1

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()


@dataclasses.dataclass(frozen=True)
class Example:
    path: Path
    question: str
    answer: str = ""  # the phantom set's answer, shown next to the example to judge the model's


def phantom_examples(root: str | Path, count: int = 4) -> list[Example]:
    """Held-out cases of the demo's phantom set (`configs/demo.py` writes it to data/phantoms), each with one
    of its closed questions as the demo's model is trained on them ("... Choices: A. .. B. .. C. .. D. ..")
    and a different kind of question for each case; none when the set is not there."""
    path = Path(root) / "vqa_test.csv"
    if not path.is_file():
        return []
    try:
        records = VQASource(path, closed=True).records
    except (OSError, ValueError):  # InputError included: a set being written, or not a phantom set
        return []
    by_case: dict[str, list[dict]] = {}
    for record in records:
        by_case.setdefault(record["image"], []).append(record)
    return [Example(Path(image), rows[number % len(rows)]["question"], rows[number % len(rows)]["answer"])
            for number, (image, rows) in enumerate(list(by_case.items())[:count])]
