import sys
from pathlib import Path

import pytest

# coco_eval_testlib.py sits next to the tests; make it importable without a package __init__.
sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLE = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "coco-panoptic-sample"


@pytest.fixture
def sample_dir() -> Path:
    """The real COCO panoptic sample shipped next to the repository (skipped in a plain clone)."""
    if not SAMPLE.is_dir():
        pytest.skip(f"real COCO sample not found at {SAMPLE} (only present in the project workspace)")
    return SAMPLE
