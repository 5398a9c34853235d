"""Plan a training run before renting the hardware: compile the trainer's own step for a target and report
per-device memory (and whether it fits), parameters, step FLOPs, time per step at MFU 0.4/0.5/0.6 and a
sharding audit. Needs only the config: no weights, tokenizer or data.

  python tools/plan_run.py --config=configs/lamed.py:stage2_phi3 --target=v5p:2x2x2 --out=plan.json
  python tools/plan_run.py --config=configs/clip.py:m3d --target=2xv5e:4x4     # two slices (dcn_data 2)
  python tools/plan_run.py --config=configs/demo.py --target=cpu:8
  python tools/plan_run.py --config=configs/lamed.py:stage2_phi3 --target=local --config.data.batch_size=8

Targets: a TPU topology name (v5e:2x2 … v5e:16x16, v5p:2x2x1 … v5p:4x4x4, v6e:…, v4:2x2x1; prefix
"Nx" for N slices; needs libtpu: pip install 'm3d_jax[tpu]'), cpu:N (N simulated CPU devices), or local
(the devices present, e.g. a GPU host). Any config key can be overridden (--config.mesh.fsdp=16 …).
The JSON keys are described in the README ("Planning a run").
"""

from __future__ import annotations

import json
import os
import sys


def _prepare_environment(argv: list[str]) -> None:
    """Before JAX starts: simulated CPU devices for cpu:N, and the CPU backend (TPU targets are compiled
    from a topology description, not run) unless the target is the local devices."""
    target = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--target=")), "")
    if target.startswith("cpu:") and target[4:].isdigit():
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={target[4:]}".strip()
    if target != "local":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # plans may run side by side


_prepare_environment(sys.argv)

from absl import flags  # noqa: E402 — after the environment above
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config (file[:variant])", lock_config=False)
_TARGET = flags.DEFINE_string("target", None, "v5e:4x4, v5p:2x2x2, 2xv5e:16x16, cpu:N or local")
_OUT = flags.DEFINE_string("out", "", "write the report as JSON here")
_HEADROOM = flags.DEFINE_float("headroom", 0.05, "fraction of device memory kept free for a plan to fit")
_AUDIT_MIB = flags.DEFINE_float("audit_mib", 64, "list replicated or under-sharded arrays above this size per device")
flags.mark_flags_as_required(["config", "target"])


def main(argv):
    del argv
    from m3d_jax.train.plan import format_report, plan, resolve_target

    report = plan(_CONFIG.value, resolve_target(_TARGET.value), headroom=_HEADROOM.value,
                  audit_bytes=int(_AUDIT_MIB.value * 1024**2))
    print(format_report(report))
    if _OUT.value:
        folder = os.path.dirname(_OUT.value)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(_OUT.value, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {_OUT.value}")
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    from m3d_jax.cli import run

    run(main)
