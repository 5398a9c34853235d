"""Write the deterministic phantom data set (M3D-Data layouts: Cap JSON, VQA CSV, Seg JSON, RefSeg CSV).

  python tools/make_phantoms.py --out=data/phantoms --num_cases=200 --seed=0
"""

from absl import flags

from m3d_jax.cli import run
from m3d_jax.data.phantoms import write_phantoms
from m3d_jax.errors import InputError

_OUT = flags.DEFINE_string("out", "data/phantoms", "Output folder.")
_NUM = flags.DEFINE_integer("num_cases", 24, "Number of volumes.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed: the same seed writes the same files.")
_SHAPE = flags.DEFINE_list("shape", ["32", "64", "64"], "Volume size D,H,W.")


def volume_shape(values: list[str]) -> tuple[int, int, int]:
    """--shape as (D, H, W); anything but three positive integers is an InputError."""
    try:
        shape = tuple(int(value) for value in values)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--shape={','.join(values)}: expected three positive integers D,H,W")
    return shape


def main(argv):
    del argv
    root = write_phantoms(_OUT.value, num_cases=_NUM.value, seed=_SEED.value, shape=volume_shape(_SHAPE.value))
    print(f"wrote {_NUM.value} phantom cases to {root}")


if __name__ == "__main__":
    run(main)
