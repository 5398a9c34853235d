"""segment_anything's PyTorch modules (the SegVol decoder's origin), loaded from their files: the package's
top-level __init__ imports torchvision, which cannot be installed beside the CPU torch build."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types


def load_sam_modeling() -> types.ModuleType:
    """Returns a package object with `.common`, `.transformer` and `.mask_decoder` submodules."""
    name = "sam_modeling_oracle"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed (pip install segment-anything)")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "modeling"
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
    for sub in ("common", "transformer", "mask_decoder"):
        sub_spec = importlib.util.spec_from_file_location(f"{name}.{sub}", folder / f"{sub}.py")
        module = importlib.util.module_from_spec(sub_spec)
        sys.modules[f"{name}.{sub}"] = module
        sub_spec.loader.exec_module(module)
        setattr(package, sub, module)
    return package
