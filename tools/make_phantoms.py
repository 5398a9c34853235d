"""Write the deterministic phantom data set (M3D-Data layouts: Cap JSON, VQA CSV, Seg JSON, RefSeg CSV).

  python tools/make_phantoms.py --out=data/phantoms --num_cases=200 --seed=0
"""

from absl import app, flags

_OUT = flags.DEFINE_string("out", "data/phantoms", "Output folder.")
_NUM = flags.DEFINE_integer("num_cases", 24, "Number of volumes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed: the same seed writes the same files.")
_SHAPE = flags.DEFINE_list("shape", ["32", "64", "64"], "Volume size D,H,W.")


def main(argv):
    del argv
    from m3d_jax.data.phantoms import write_phantoms

    root = write_phantoms(_OUT.value, num_cases=_NUM.value, seed=_SEED.value, shape=tuple(int(s) for s in _SHAPE.value))
    print(f"wrote {_NUM.value} phantom cases to {root}")


if __name__ == "__main__":
    app.run(main)
