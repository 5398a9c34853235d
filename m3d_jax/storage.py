"""Paths that may be URLs (`gs://`, `s3://`, `memory://`: any fsspec filesystem), for the files that are read
or written with local readers and writers:

- `local_copy(url)`: an input (a checkpoint file or folder, `config.init.*`, a tool's `--ckpt`) copied once
  into the local cache `$M3D_JAX_CACHE/init/<sha256(url)[:16]>/` (default `~/.cache/m3d_jax`), then read
  from there. A copy counts only once complete: it is downloaded under a temporary name and renamed.
- `RunFolder(workdir)`: a run's side files (metrics and samples logs, TensorBoard events, the PyTorch
  export). A local workdir is written in place; for a URL they are written to a local staging folder
  (`$M3D_JAX_CACHE/runs/`) and uploaded, and logs already in the workdir are downloaded first, so a resumed
  run appends to them.

Orbax checkpoints read and write URLs themselves and do not go through here. A path with no `://`, or a
`file://` one, is local."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import fsspec
from absl import logging

from m3d_jax.errors import InputError, first_line

CACHE_ENV = "M3D_JAX_CACHE"


class StorageError(InputError):
    """A URL that is missing or cannot be read or written; the message names it."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL of a filesystem other than the local one."""
    path = str(path)
    return "://" in path and not path.startswith("file://")


def cache_root() -> Path:
    """The local cache for copies of remote inputs and staged run files (`$M3D_JAX_CACHE`)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "m3d_jax")


def filesystem(url: str):
    """(fsspec filesystem, path within it) of a URL or local path; a StorageError for an unknown protocol."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # an unknown protocol, or its fsspec package missing (gcsfs, s3fs)
        raise StorageError(f"{url}: cannot open this URL ({first_line(error)})") from None


def _key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def local_copy(path: str | os.PathLike) -> str:
    """`path` itself if local (a `file://` prefix removed); for a URL, its local copy (a file or a folder,
    copied whole on first use and reused after: delete the cache folder to fetch a changed URL again)."""
    path = str(path)
    if not is_remote(path):
        return path.removeprefix("file://")
    fs, remote = filesystem(path)
    remote = remote.rstrip("/")
    folder = cache_root() / "init" / _key(path.rstrip("/"))
    local = folder / PurePosixPath(remote).name  # the name kept: a `.pth` or `pretrained_ViT.bin` says its kind
    if local.exists():
        return str(local)
    if not fs.exists(remote):
        raise StorageError(f"{path}: no such file or folder")
    folder.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        try:
            _download(fs, remote, partial / local.name)
        except OSError as error:
            raise StorageError(f"{path}: cannot copy it to {folder} ({first_line(error)})") from None
        try:
            os.replace(partial / local.name, local)
        except OSError:  # another process on this host finished the same copy first
            if not local.exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logging.info("copied %s to %s", path, local)
    return str(local)


def _download(fs, remote: str, local: Path) -> None:
    """The file or folder `remote` (recursively) to `local`."""
    if not fs.isdir(remote):
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
        return
    for name in fs.find(remote):  # every file under it, named from the filesystem's root as `remote` is
        target = local / name[len(remote):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(name, str(target))


class RunFolder:
    """A run's workdir for the files written with local writers: `local(name)` is where to write `name`,
    `upload(name)` sends it (a file, or a folder recursively) to the workdir when that is a URL.

    A local workdir is the staging folder itself, so nothing is copied; `url(name)` says where a file ends up."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.remote = is_remote(workdir)
        if self.remote:
            self._fs, self._root = filesystem(workdir)
            self._root = self._root.rstrip("/")
            runs = cache_root() / "runs"
            runs.mkdir(parents=True, exist_ok=True)
            self.staging = tempfile.mkdtemp(prefix=f"{_key(workdir)}-", dir=runs)
        else:
            self.staging = workdir.removeprefix("file://")
            os.makedirs(self.staging, exist_ok=True)

    def local(self, name: str) -> str:
        return os.path.join(self.staging, name)

    def url(self, name: str) -> str:
        return f"{self.workdir.rstrip('/')}/{name}" if self.remote else self.local(name)

    def open_log(self, name: str):
        """`name` opened for appending; for a URL workdir, what it already holds is downloaded first."""
        if self.remote and self._fs.exists(f"{self._root}/{name}"):
            try:
                self._fs.get_file(f"{self._root}/{name}", self.local(name))
            except OSError as error:
                raise StorageError(f"{self.url(name)}: cannot read it to append ({first_line(error)})") from None
        return open(self.local(name), "a")

    def upload(self, name: str) -> None:
        """Sends the staged file or folder `name` to the workdir (its files replaced, others kept)."""
        if not self.remote or not os.path.exists(self.local(name)):
            return
        source = Path(self.local(name))
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        try:
            for file in files:
                target = f"{self._root}/{file.relative_to(self.staging).as_posix()}"
                self._fs.put_file(str(file), target)
        except OSError as error:
            raise StorageError(f"{self.url(name)}: cannot upload ({first_line(error)})") from None

    def close(self) -> None:
        """Removes the staging folder of a URL workdir (upload first what should be kept)."""
        if self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)
