"""python -m m3d_jax.train --config=configs/NAME.py --workdir=DIR [--config.key=value ...]

Trains (or resumes) the run in DIR. Multi-host jobs start one such process per host (see launch/)."""

import os
import sys

from absl import flags
from ml_collections import config_flags

from m3d_jax.cli import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:variant])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, TensorBoard, exports "
                               "(local path or gs://; shared by all hosts)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from absl import logging

    if not flags.FLAGS["verbosity"].present:  # keep the console to the progress bar and our messages
        logging.set_verbosity(logging.WARNING)

    # Imported in this order on purpose: the platform is chosen before anything imports jax's backends,
    # and the distributed runtime starts before the trainer touches a device.
    from m3d_jax.train.platform import select_platform

    config = _CONFIG.value
    select_platform(config)
    from m3d_jax.train.distributed import initialize

    initialize()
    from m3d_jax.train.trainer import StoppedWaitingForData, train

    try:
        train(config, _WORKDIR.value)
    except StoppedWaitingForData as stopped:
        print(stopped, flush=True)
        sys.stderr.flush()
        os._exit(0)  # reader threads blocked in a read would keep the interpreter from exiting


if __name__ == "__main__":

    run(main)
