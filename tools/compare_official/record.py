"""Record the official outputs of the tiny configuration that ``packages/maskdino/tests/test_official_parity.py``
checks our model against, so that CI needs no official code.

Everything that defines the recording (the official yaml and overrides, the seeded weight function, the input
image and its resize) lives in the test module and is imported from it here, so there is one definition. Before
saving, the margins of every discontinuous decision of the forward are checked against float32 rounding: the gap
between the k-th and (k+1)-th encoder token scores (top-k membership) and the mask-to-box thresholds of the
mask-enhanced anchors (a mask logit near 0 at a box edge would move the anchor by a pixel on another CPU).
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .official import build_official, detectron2_test_input, import_official
from .stages import official_batch, run_official
from .weights import key_list

__all__ = ["PARITY_TEST", "load_parity_test", "record_fixture"]

PARITY_TEST = (
    Path(__file__).resolve().parents[2] / "packages" / "maskdino" / "tests" / "test_official_parity.py"
)

#: a decision closer than this to its threshold (relative to the values' scale, the parity test's tolerance) could flip
#: on another CPU.
MARGIN = 1e-4


def load_parity_test() -> types.ModuleType:
    """The parity test module (its recording definitions), loaded from its file."""
    spec = importlib.util.spec_from_file_location("test_official_parity", PARITY_TEST)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {PARITY_TEST}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _revision(repo: Path) -> str:
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (not a git checkout)"


def _mask_box_sensitive(masks: Tensor, eps: float) -> int:
    """Queries whose foreground extent (rows / columns with a logit > 0) changes when the threshold moves by
    ``+-eps``."""

    def extent(fg: Tensor) -> Tensor:
        return torch.cat([fg.any(-1), fg.any(-2)], -1)

    return int((extent(masks > eps) != extent(masks > -eps)).any(-1).sum())


def _flat_outputs(out: Any) -> dict[str, Tensor]:
    flat: dict[str, Tensor] = {}
    named = [("final", out.final), *[(f"aux{i}", a) for i, a in enumerate(out.aux)], ("interm", out.interm)]
    for name, level in named:
        for field, t in level.tensors():
            flat[f"{name}.{field}"] = t.detach().clone().contiguous()
    return flat


def record_fixture(path: Path, maskdino_repo: Path, detectron2_repo: Path | None, tmp: Path) -> int:
    """Record the fixture at ``path``; returns the exit status (1 when a margin is too small to record)."""
    t = load_parity_test()
    import_official(maskdino_repo, detectron2_repo, tmp)
    off, cfg = build_official(maskdino_repo / t.OFFICIAL_YAML, "cpu", 0, t.OFFICIAL_OPTS)
    keys = key_list(off)
    result = off.load_state_dict(t.official_weights(keys, t.WEIGHT_SEED), strict=False)
    assert not result.unexpected_keys and all(k.startswith("criterion.") for k in result.missing_keys), result

    # the input: our PIL resize must give detectron2's pixels
    image = t.parity_image(t.IMAGE_SEED)
    x_img = t.parity_input()
    from PIL import Image

    png = tmp / "parity_image.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(png)
    d2 = cfg.clone()
    d2.defrost()
    d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MAX_SIZE_TEST = t.TEST_RESIZE
    d2_image, _ = detectron2_test_input(png, d2)
    if not torch.equal(d2_image.float(), x_img):
        raise SystemExit("maskdino's PIL resize differs from detectron2's on the parity image")

    x, sizes = official_batch(off, [x_img])
    run = run_official(off, x)
    k = off.sem_seg_head.predictor.num_queries
    assert run.scores is not None and run.outputs.interm is not None and run.outputs.interm.masks is not None
    scores = run.scores.sort(dim=1, descending=True).values
    gap = float((scores[:, k - 1] - scores[:, k]).min())
    order_gap = float((scores[:, : k - 1] - scores[:, 1:k]).min())
    distinct = int(torch.unique(run.outputs.interm.logits[0], dim=0).shape[0])
    interm_masks = run.outputs.interm.masks
    sensitive = _mask_box_sensitive(interm_masks, MARGIN * float(interm_masks.abs().max()))
    print(
        f"top-k membership gap {gap:.3e} (scores up to {float(scores.abs().max()):.3f}); smallest gap inside "
        f"the top-k {order_gap:.3e}; queries whose mask box moves with the threshold +-{MARGIN:g} x max: {sensitive}"
    )
    print(f"distinct selected queries: {distinct} of {k}")
    if gap < MARGIN * float(scores.abs().max()) or sensitive or distinct != k:
        print("a decision is within reach of float32 rounding: change the seeds in the test")
        return 1
    fixture = {
        "official_yaml": t.OFFICIAL_YAML,
        "official_opts": list(t.OFFICIAL_OPTS),
        "weight_seed": t.WEIGHT_SEED,
        "image_seed": t.IMAGE_SEED,
        "keys": [(key, list(shape), tied) for key, shape, tied in keys],
        "image_size": list(x_img.shape[-2:]),
        "padded_size": list(x.shape[-2:]),
        "input_sha256": hashlib.sha256(x_img.to(torch.uint8).numpy().tobytes()).hexdigest(),
        "outputs": _flat_outputs(run.outputs),
        "margins": {"topk_gap": gap, "topk_order_gap": order_gap, "mask_box_sensitive_queries": sensitive},
        "source": {
            "maskdino": _revision(maskdino_repo),
            "detectron2": _revision(detectron2_repo) if detectron2_repo else "installed",
            "torch": str(torch.__version__),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, path)
    shapes = {name: tuple(v.shape) for name, v in fixture["outputs"].items()}
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB): {len(keys)} official keys, outputs {shapes}")
    return 0
