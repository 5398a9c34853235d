"""The README's fit and scaling tables, from tools/plan_run.py reports.

  python tools/plan_table.py --search                 # smallest v5e and v5p slice per released recipe
  python tools/plan_table.py --scaling                # LaMed-Llama-2-7B, everything trained, v5p 8 → 64 chips
  python tools/plan_table.py --readme                 # rewrite the README tables from tools/plans/*.json

--search walks each family's slices from small to large and stops at the first that fits; a slice whose
parameters, optimizer state and gradients alone exceed its memory is skipped without compiling (the
reports say so). Reports land in tools/plans/ (one JSON per recipe and target; existing ones are reused,
--force recompiles). --only=NAME restricts to recipes whose key contains NAME, --family=v5e|v5p to one family.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # noqa: E402 — after the environment above

from m3d_jax.cli import run  # noqa: E402
from m3d_jax.config import load_config_file  # noqa: E402
from m3d_jax.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "tools" / "plans"
README = ROOT / "README.md"

# key → (name in the table, config, overrides). Batch sizes are the configs' (the references' global batch).
RECIPES = {
    "lamed_phi3_stage1": ("LaMed-Phi-3 stage 1", "configs/lamed.py:stage1_phi3", ()),
    "lamed_phi3_stage2": ("LaMed-Phi-3 stage 2", "configs/lamed.py:stage2_phi3", ()),
    "lamed_llama2_stage2": ("LaMed-Llama-2-7B stage 2", "configs/lamed.py:stage2_llama2", ()),
    "m3d_clip": ("M3D-CLIP", "configs/clip.py:m3d", ()),
    "med2e3_stage2": ("Med-2E3 stage 2", "configs/med2e3.py:stage2", ()),
    # batch 10: two data-parallel ways divide it; the rest of the slice splits heads and MLPs
    "med3dinsight_pretrain": ("Med3DInsight pretraining", "configs/med3dinsight.py:pretrain",
                              ("--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=-1")),
}
SLICES = {"v5e": ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16"),
          "v5p": ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4")}
SCALING = ("lamed_llama2_full", "LaMed-Llama-2-7B, everything trained", "configs/lamed.py:stage2_llama2",
           ("--config.trainable=.*", "--config.lora.rank=0"), ("v5p:2x2x2", "v5p:4x4x2", "v5p:4x4x4"))

_SEARCH = flags.DEFINE_bool("search", False, "find the smallest fitting v5e and v5p slice per recipe")
_SCALING = flags.DEFINE_bool("scaling", False, "plan the scaling table")
_README = flags.DEFINE_bool("readme", False, "rewrite the README tables from tools/plans")
_FORCE = flags.DEFINE_bool("force", False, "recompile plans that exist")
_ONLY = flags.DEFINE_string("only", "", "only recipes whose key contains this")
_FAMILY = flags.DEFINE_string("family", "", "only this slice family (v5e or v5p)")

GIB = 1024**3


def _path(key: str, target: str) -> Path:
    return PLANS / f"{key}__{target.replace(':', '_')}.json"


def _run_plan(key: str, config: str, overrides, target: str) -> dict | None:
    path = _path(key, target)
    if path.exists() and not _FORCE.value:
        return json.loads(path.read_text())
    command = [sys.executable, "tools/plan_run.py", f"--config={config}", f"--target={target}", f"--out={path}",
               *overrides]
    print("$", " ".join(command[1:]), flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 1):
        print(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed", flush=True)
        return None
    report = json.loads(path.read_text())
    report["command"] = " ".join(["python", *command[1:]]).replace(f"--out={path}", "").strip()
    path.write_text(json.dumps(report, indent=1))
    print(f"  {target}: {'fits' if report['fits'] else 'does not fit'}", flush=True)
    return report


def _state_alone_overflows(config: str, overrides, target: str) -> bool:
    """True when parameters + optimizer state + gradients per device exceed the target's memory (no compile)."""
    from m3d_jax.train.plan import abstract_run, resolve_target, state_bytes

    resolved = resolve_target(target)
    parts = state_bytes(abstract_run(_load_config(config, overrides), resolved))["per_device"]
    return sum(parts.values()) > (resolved.memory_bytes or float("inf"))


def _load_config(spec: str, overrides):
    """configs/FILE.py[:variant] with `--config.a.b=value` overrides applied (Python literals or strings)."""
    config = load_config_file(ROOT / spec)
    for override in overrides:
        keys, _, text = override.removeprefix("--config.").partition("=")
        *parents, leaf = keys.split(".")
        node = config
        for key in parents:
            node = node[key]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(node.get(leaf), tuple) and not isinstance(value, tuple):
            value = (value,)  # one value for a tuple key, as config_flags reads it
        node[leaf] = value
    return config


def _plannable(config: str, overrides, target: str) -> bool:
    """False (and why, printed) when the run cannot be laid out on the target, e.g. a global batch smaller
    than the slice's data-parallel ways."""
    from m3d_jax.train.plan import PlanError

    try:
        overflows = _state_alone_overflows(config, overrides, target)
    except PlanError as error:
        print(f"{target}: {error}; skipped", flush=True)
        return False
    if overflows:
        print(f"{target}: the state alone exceeds memory; skipped", flush=True)
    return not overflows


def search() -> None:
    for key, (_, config, overrides) in RECIPES.items():
        if _ONLY.value not in key:
            continue
        for family, targets in SLICES.items():
            if _FAMILY.value and family != _FAMILY.value:
                continue
            for target in targets:
                if not _path(key, target).exists() and not _plannable(config, overrides, target):
                    continue
                report = _run_plan(key, config, overrides, target)
                if report is not None and report["fits"]:
                    break


def scaling() -> None:
    key, _, config, overrides, targets = SCALING
    for target in targets:
        _run_plan(key, config, overrides, target)


def _row(report: dict) -> str:
    per_device = report["per_device_bytes"]
    mesh = " × ".join(f"{axis} {size}" for axis, size in report["mesh"].items() if size > 1) or "1"
    total = per_device.get("total")
    memory = f"{per_device.get('arguments', 0) / GIB:.2f} + {per_device.get('temporaries', 0) / GIB:.2f}" \
        if "arguments" in per_device else "—"
    days = report.get("days_for_total_steps_at_mfu_0.5")
    return (f"| {report['target']} | {report['chips']} | {mesh} | {report['global_batch']} | {memory} | "
            f"{(total or 0) / GIB:.2f} / {report['device_memory_bytes'] / GIB:.2f} | "
            f"{report['model_flops_per_step']:.3g} | {report['hardware_flops_per_step'] or 0:.3g} | "
            f"{report['seconds_per_step_at_mfu']['0.5']:.3g} | {days:.2f} |")


HEADER = ("| slice | chips | mesh | global batch | arguments + temporaries (GiB/chip) | total / HBM (GiB) | "
          "model FLOPs/step | hardware FLOPs/step | s/step at MFU 0.5 | days for the recipe's steps |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def _reports(key: str) -> list[dict]:
    found = [json.loads(path.read_text()) for path in sorted(PLANS.glob(f"{key}__*.json"))]
    return sorted(found, key=lambda report: (report["device_kind"], report["num_devices"]))


def readme() -> None:
    lines = ["Smallest slice that fits, per family (`fits`: total per chip under 95% of HBM):", "",
             "| recipe | " + HEADER.splitlines()[0][2:], "| --- " + HEADER.splitlines()[1]]
    tried = []
    for key, (name, config, overrides) in RECIPES.items():
        reports = _reports(key)
        for family in SLICES:
            fitting = [r for r in reports if r["fits"] and r["target"].startswith(family)]
            if fitting:
                lines.append(f"| {name} " + _row(fitting[0]))
            else:
                lines.append(f"| {name} | {family}: not planned yet |" + " |" * 9)
        misses = [r["target"] for r in reports if not r["fits"]]
        command = f"python tools/plan_run.py --config={config} --target=SLICE" + "".join(f" {o}" for o in overrides)
        tried.append(f"- {name}: `{command}`" + (f"; did not fit: {', '.join(misses)}" if misses else ""))
    key, name, config, overrides, targets = SCALING
    lines += ["", "Commands, and the smaller slices that did not fit:", "", *tried, "",
              f"Scaling: {name} (`--config.trainable=.* --config.lora.rank=0`), fsdp over the whole slice:", "",
              HEADER]
    by_target = {r["target"]: r for r in _reports(key)}
    for target in targets:
        lines.append(_row(by_target[target]) if target in by_target else f"| {target} | not planned yet |" + " |" * 8)
    block = "\n".join(lines)
    text = README.read_text()
    start, end = "<!-- plan-tables:start -->", "<!-- plan-tables:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise InputError(f"{README}: no {start} … {end} block to rewrite")
    README.write_text(pattern.sub(lambda _: f"{start}\n{block}\n{end}", text))
    print(f"rewrote the plan tables in {README}")


def main(argv):
    del argv
    PLANS.mkdir(parents=True, exist_ok=True)
    if _SEARCH.value:
        search()
    if _SCALING.value:
        scaling()
    if _README.value:
        readme()


if __name__ == "__main__":
    run(main)
