"""Training metrics: one writer that sends scalars to the console (progress bar), TensorBoard and a JSONL
file (primary process only), in the run folder (a local workdir, or a URL's staging folder uploaded at each
write: `m3d_jax.storage.RunFolder`). FLOPs and utilisation are in `flops.py`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping

from m3d_jax.storage import RunFolder

_SHOWN = ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "hfu", "accuracy")  # on the progress bar


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` (appending to what a resumed run's holds) and TensorBoard
    (`workdir/tensorboard`) and shows progress: a bar on a terminal, else one line per logged step (a log
    file or CI gets no carriage-return updates); on non-primary processes it does nothing."""

    def __init__(self, folder: RunFolder, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self._folder = folder
        self._bar = self._tb = self._file = None
        self._total, self._lines = total_steps, progress and not sys.stderr.isatty()
        if not enabled:
            return
        self._file = folder.open_log("metrics.jsonl")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(folder.local("tensorboard"))
        except ImportError:  # the dependency is declared; keep training if someone removed it
            self._tb = None
        if progress and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        self._file.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._upload()
        shown = {k: f"{v:.4g}" for k, v in clean.items() if k in _SHOWN}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        elif self._lines and prefix == "train":
            seconds = clean.get("step_time_s")
            pace = f", {seconds:.3g} s/step" if seconds else ""
            print(f"step {step}/{self._total}: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + pace, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _upload(self) -> None:
        if self._folder.remote:
            if self._tb is not None:
                self._tb.flush()
                self._folder.upload("tensorboard")
            self._folder.upload("metrics.jsonl")

    def close(self) -> None:
        for handle in (self._bar, self._tb, self._file):
            if handle is not None:
                handle.close()
        if self.enabled:
            self._upload()
