"""Write the deterministic phantom data set (M3D-Data layouts: Cap JSON, VQA CSV, Seg JSON, RefSeg CSV).

  python tools/make_phantoms.py --out=data/phantoms --num_cases=200 --seed=0
"""

from absl import flags

from m3d_jax.cli import run, volume_size
from m3d_jax.data.phantoms import write_phantoms

_OUT = flags.DEFINE_string("out", "data/phantoms", "Output folder.")
_NUM = flags.DEFINE_integer("num_cases", 24, "Number of volumes.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed: the same seed writes the same files.")
_SHAPE = flags.DEFINE_list("shape", ["32", "64", "64"], "Volume size D,H,W.")


def main(argv):
    del argv
    shape = volume_size(_SHAPE.value, "shape")
    root = write_phantoms(_OUT.value, num_cases=_NUM.value, seed=_SEED.value, shape=shape)
    print(f"wrote {_NUM.value} phantom cases to {root}")


if __name__ == "__main__":
    run(main)
