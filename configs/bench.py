"""M3D-Bench data: where each task's held-out records are (tools/evaluate.py --data=configs/bench.py[:layout]).

  configs/bench.py            M3D-Data under --root (default data/M3D-Data): M3D-Cap test (retrieval, report),
                              M3D-VQA test (closed, open), M3D-Seg 0003 test (REC, REG; the reference uses
                              sub-dataset 0003 only), M3D-Seg 0011 test (semantic seg), M3D-RefSeg test.
  configs/bench.py:phantoms   the phantom set (tools/make_phantoms.py) under data/phantoms.

A data folder given to tools/evaluate.py picks the layout itself: phantoms if it holds cap.json, else M3D-Data.
The reference Bench's "referring segmentation" asks with organ descriptions; here refseg is M3D-RefSeg's test
questions.
"""

from ml_collections import ConfigDict


def get_config(layout: str = "m3d") -> ConfigDict:
    if layout == "phantoms":
        root = "data/phantoms"
        tasks = {"retrieval": ("cap", "cap.json", "test"), "report": ("cap", "cap.json", "test"),
                 "vqa_closed": ("vqa_closed", "vqa_test.csv", ""), "vqa_open": ("vqa_open", "vqa_test.csv", ""),
                 "rec": ("rec", "seg.json", "test"), "reg": ("reg", "seg.json", "test"),
                 "seg": ("seg", "seg.json", "test"), "refseg": ("refseg", "refseg.csv", "")}
    elif layout == "m3d":
        root = "data/M3D-Data"
        tasks = {"retrieval": ("cap", "M3D_Cap/M3D_Cap.json", "test"), "report": ("cap", "M3D_Cap/M3D_Cap.json", "test"),
                 "vqa_closed": ("vqa_closed", "M3D_VQA/M3D_VQA_test.csv", ""),
                 "vqa_open": ("vqa_open", "M3D_VQA/M3D_VQA_test.csv", ""),
                 "rec": ("rec", "M3D_Seg/0003/0003.json", "test"), "reg": ("reg", "M3D_Seg/0003/0003.json", "test"),
                 "seg": ("seg", "M3D_Seg/0011/0011.json", "test"),
                 "refseg": ("refseg", "M3D_RefSeg/M3D_RefSeg_test.csv", "")}
    else:
        raise ValueError(f"unknown bench layout {layout!r} (m3d or phantoms)")
    return ConfigDict(dict(root=root, tasks={task: dict(kind=kind, path=path, split=split)
                                             for task, (kind, path, split) in tasks.items()}))
