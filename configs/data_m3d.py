"""The M3D-Data training mixture (as the LaMed stage-2 recipe mixes it), or the phantom set:

  configs/data_m3d.py           M3D-Data under --config.root (M3D_Cap, M3D_VQA, M3D_Seg, M3D_RefSeg)
  configs/data_m3d.py:phantoms  tools/make_phantoms.py output under --config.root

Training configs embed this as their `data` section; point `root` at your copy of M3D-Data, e.g.
`--config.data.root=/data/M3D-Data`. Source paths are relative to root (joined when the sources are built).
`batch_size` is the GLOBAL batch (each process loads only its rows).
"""

from ml_collections import ConfigDict

from m3d_jax.config import data_section


def get_config(layout: str = "m3d") -> ConfigDict:
    config = data_section(root="data/phantoms" if layout == "phantoms" else "data/M3D-Data", batch_size=8,
                          max_length=512)
    if layout == "phantoms":
        files = [("cap", "cap.json", "train", 1.0), ("vqa_closed", "vqa_train.csv", "", 2.0),
                 ("vqa_open", "vqa_train.csv", "", 1.0), ("seg", "seg.json", "training", 1.0),
                 ("refseg", "refseg.csv", "", 0.5)]
    elif layout == "m3d":
        files = [("cap", "M3D_Cap/M3D_Cap.json", "train", 1.0),
                 ("vqa_closed", "M3D_VQA/M3D_VQA_train.csv", "", 1.0),
                 ("vqa_open", "M3D_VQA/M3D_VQA_train.csv", "", 1.0),
                 ("seg", "M3D_Seg/0011/0011.json", "training", 0.5),
                 ("refseg", "M3D_RefSeg/M3D_RefSeg.csv", "", 0.5)]
    else:
        raise ValueError(f"unknown data layout {layout!r} (m3d or phantoms)")
    config.sources = [ConfigDict(dict(kind=k, path=p, split=s, weight=w))
                      for k, p, s, w in files]
    return config
