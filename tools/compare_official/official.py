"""Import and build the official Mask DINO (IDEA-Research/MaskDINO on detectron2) from the user's checkouts.

Nothing of the official code is vendored and the checkouts are never modified:

* ``MaskDINO/maskdino`` is copied into a temporary directory as ``maskdino_official`` (our package is also called
  ``maskdino``); in the copy its absolute ``maskdino.`` imports are renamed, ``__init__.py`` is replaced by one that
  imports only the model (no dataset / evaluator registration) and the Swin import is made optional (it needs timm);
* the compiled CUDA op ``MultiScaleDeformableAttention`` is replaced by a stub whose functions raise, so the official
  ``MSDeformAttn`` takes its own pure-PyTorch fallback (``ms_deform_attn_core_pytorch``); nothing is compiled;
* detectron2 is imported from its source checkout (pure Python, ``detectron2._C`` is not needed); the two project
  modules the official code imports (PointRend's ``point_features``, DeepLab's ``add_deeplab_config``) are loaded
  alone from the checkout, so PointRend's other modules (OpenCV) are not imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shutil
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "OFFICIAL_PACKAGE",
    "OFFICIAL_YAMLS",
    "build_official",
    "detectron2_test_input",
    "import_official",
    "official_yaml_for",
]

#: our preset -> the official config file it reproduces (relative to the MaskDINO checkout).
OFFICIAL_YAMLS: dict[str, str] = {
    "coco-instance-r50-3s-d1-2048": "configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml",
    "coco-instance-r50-4s": "configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml",
    "coco-instance-r50-3s-hid1024": "configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s.yaml",
    "coco-panoptic-r50": "configs/coco/panoptic-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml",
    "ade20k-semantic-r50": "configs/ade20k/semantic-segmentation/maskdino_R50_bs16_160k_steplr.yaml",
}

OFFICIAL_PACKAGE = "maskdino_official"

_MINIMAL_INIT = '''"""Written by tools/compare_official: the official model only (no dataset/evaluator registration)."""
from . import modeling
from .config import add_maskdino_config
from .maskdino import MaskDINO
'''

_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)maskdino(?=[.\s])", re.MULTILINE)


def _copy_official_package(maskdino_repo: Path, dest: Path) -> int:
    """Copy ``maskdino_repo/maskdino`` to ``dest/maskdino_official``, importable under that name; returns the
    number of absolute imports renamed."""
    src = maskdino_repo / "maskdino"
    if not (src / "maskdino.py").is_file():
        raise SystemExit(
            f"--maskdino-repo: {src}/maskdino.py not found (expected an IDEA-Research/MaskDINO checkout)"
        )
    pkg = dest / OFFICIAL_PACKAGE
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "build", "src"))
    renamed = 0
    for path in pkg.rglob("*.py"):
        text, n = _IMPORT.subn(rf"\1\2\3{OFFICIAL_PACKAGE}", path.read_text())
        if n:
            path.write_text(text)
            renamed += n
    (pkg / "__init__.py").write_text(_MINIMAL_INIT)
    modeling_init = pkg / "modeling" / "__init__.py"
    modeling_init.write_text(
        re.sub(
            r"^from \.backbone\.swin import (.+)$",
            r"try:\n    from .backbone.swin import \1\nexcept ImportError:  # timm missing: no Swin backbone\n    pass",
            modeling_init.read_text(),
            flags=re.MULTILINE,
        )
    )
    return renamed


def _stub_compiled_op() -> None:
    """``import MultiScaleDeformableAttention`` succeeds; its functions raise, so the official module falls back to
    its pure-PyTorch implementation."""

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "MultiScaleDeformableAttention stub (tools/compare_official): use the PyTorch fallback"
        )

    stub = types.ModuleType("MultiScaleDeformableAttention")
    stub.ms_deform_attn_forward = unavailable  # type: ignore[attr-defined]
    stub.ms_deform_attn_backward = unavailable  # type: ignore[attr-defined]
    sys.modules["MultiScaleDeformableAttention"] = stub


def _project_dir(d2_repo: Path, project: str, package: str) -> Path:
    for cand in (d2_repo / "projects" / project / package, d2_repo / "detectron2" / "projects" / package):
        if cand.is_dir():
            return cand
    raise SystemExit(
        f"--detectron2-repo: neither projects/{project}/{package} nor detectron2/projects/{package} "
        f"in {d2_repo}"
    )


def _load_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _install_d2_projects(d2_repo: Path) -> None:
    """Register ``detectron2.projects.point_rend`` / ``.deeplab`` as bare packages over the checkout's folders (their
    ``__init__`` is not run) and load DeepLab's ``add_deeplab_config``."""
    import detectron2.projects as projects

    for project, package in (("PointRend", "point_rend"), ("DeepLab", "deeplab")):
        name = f"detectron2.projects.{package}"
        module = types.ModuleType(name)
        module.__path__ = [str(_project_dir(d2_repo, project, package))]
        sys.modules[name] = module
        setattr(projects, package, module)
    deeplab = sys.modules["detectron2.projects.deeplab"]
    config = _load_module("detectron2.projects.deeplab.config", Path(deeplab.__path__[0]) / "config.py")
    deeplab.add_deeplab_config = config.add_deeplab_config  # type: ignore[attr-defined]


def import_official(maskdino_repo: Path, detectron2_repo: Path | None, tmp: Path) -> types.ModuleType:
    """Import the official package as ``maskdino_official`` (see the module docstring) and return it."""
    if OFFICIAL_PACKAGE in sys.modules:
        return sys.modules[OFFICIAL_PACKAGE]
    renamed = _copy_official_package(maskdino_repo, tmp)
    _stub_compiled_op()
    if detectron2_repo is not None:
        if not (detectron2_repo / "detectron2" / "__init__.py").is_file():
            raise SystemExit(f"--detectron2-repo: {detectron2_repo}/detectron2/__init__.py not found")
        sys.path.insert(0, str(detectron2_repo))
    sys.path.insert(0, str(tmp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import detectron2
        except ImportError as e:
            raise SystemExit(
                f"cannot import detectron2 ({e}); pass --detectron2-repo and install its pure-Python "
                "dependencies (see tools/README.md)"
            ) from e
        _install_d2_projects(detectron2_repo or Path(detectron2.__file__).resolve().parent.parent)
        official = importlib.import_module(OFFICIAL_PACKAGE)
    print(
        f"official package: {maskdino_repo / 'maskdino'} -> {tmp / OFFICIAL_PACKAGE} ({renamed} imports renamed)"
    )
    print(f"detectron2: {Path(detectron2.__file__).parent}")
    return official


def official_yaml_for(preset: str, maskdino_repo: Path, override: Path | None) -> Path:
    """The official config file of ``preset`` (``override``: a path, or one relative to the checkout)."""
    if override is not None:
        path = override if override.is_file() else maskdino_repo / override
    elif preset in OFFICIAL_YAMLS:
        path = maskdino_repo / OFFICIAL_YAMLS[preset]
    else:
        raise SystemExit(f"no official yaml known for preset {preset!r}: pass --official-yaml")
    if not path.is_file():
        raise SystemExit(f"official config not found: {path}")
    return path


def build_official(yaml_path: Path, device: str, seed: int, opts: Sequence[str] = ()) -> tuple[Any, Any]:
    """The official model from its yaml (as its ``train_net.setup``: DeepLab + Mask DINO config, then ``opts``, a
    flat ``KEY VALUE ...`` list for ``merge_from_list``), in eval mode, with the initialisation of ``seed``.

    Returns:
        ``(model, cfg)``.
    """
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config
    from maskdino_official import add_maskdino_config  # type: ignore[import-not-found]

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskdino_config(cfg)
    cfg.merge_from_file(str(yaml_path))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its loss weight dict
        model = build_model(cfg)
    return model.eval(), cfg


def detectron2_test_input(path: Path, cfg: Any) -> tuple[Tensor, tuple[int, int]]:
    """An image as the official evaluation reads it: detectron2's ``read_image`` (PIL, EXIF, ``cfg.INPUT.FORMAT``)
    and its test augmentation (``build_augmentation(cfg, is_train=False)``: ``ResizeShortestEdge`` with
    ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), as its ``DatasetMapper`` does.

    Returns:
        ``(image (3, h, w) uint8, (H, W) of the image before the resize)``.
    """
    from detectron2.data import detection_utils
    from detectron2.data import transforms as T

    image = detection_utils.read_image(str(path), format=cfg.INPUT.FORMAT)
    size = image.shape[:2]
    aug_input = T.AugInput(image)
    T.AugmentationList(detection_utils.build_augmentation(cfg, is_train=False))(aug_input)
    chw = np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))
    return torch.from_numpy(chw), (int(size[0]), int(size[1]))
