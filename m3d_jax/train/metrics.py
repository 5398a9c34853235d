"""Training metrics: a FLOP count of the compiled step, MFU against the accelerator's peak, and one writer
that sends scalars to the console (progress bar), TensorBoard and a JSONL file (primary process only)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax

# Dense bf16 peak FLOP/s per chip (vendor figures), matched against `device.device_kind` by substring.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
)


def peak_flops(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """The device's peak FLOP/s (bf16 dense), `override` if positive; None when unknown (e.g. CPU)."""
    if override > 0:
        return override
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def step_flops(lowered: jax.stages.Lowered) -> float | None:
    """FLOPs of one step over the whole (global) batch, from XLA's cost analysis of the lowered program
    (it counts what runs, including rematerialised recomputation, so MFU here is a hardware-FLOPs view)."""
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 — some backends cannot analyse before compilation
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def mfu(flops_per_step: float | None, seconds_per_step: float, num_devices: int, peak: float | None) -> float | None:
    if not flops_per_step or not peak or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * num_devices)


_SHOWN = ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "accuracy")  # on the progress bar


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (`workdir/tensorboard`) and shows a
    progress bar; on non-primary processes it does nothing."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self._bar = self._tb = self._file = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # the dependency is declared; keep training if someone removed it
            self._tb = None
        if progress:
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
        if self._bar is not None:
            shown = {k: f"{v:.4g}" for k, v in clean.items() if k in _SHOWN}
            self._bar.set_postfix(shown, refresh=False)

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

    def close(self) -> None:
        for handle in (self._bar, self._tb, self._file):
            if handle is not None:
                handle.close()
