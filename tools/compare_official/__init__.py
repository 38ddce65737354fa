"""Compare this Mask DINO with the official one (IDEA-Research/MaskDINO on detectron2), numerically and in speed.

One entry point, ``python -m tools.compare_official`` (from the repository root; see tools/README.md). The official
code is imported at run time from your own checkouts, never vendored or modified (:mod:`.official`).

==============  ===============================================================================================
module          what
==============  ===============================================================================================
``official``    import the official package into a temporary copy, stub its compiled op, build it from its yaml
``weights``     random official weights (every tensor, FrozenBN included), conversion with our converter
``inputs``      a photo after the standard test resize (PIL bilinear, as detectron2), synthetic images
``stages``      each stage of both models on the same input; official outputs as our typed outputs
``report``      rows, tolerances, JSON
``checks``      official mode: raw outputs (with two-stage top-k tie handling), settings, post-processing
``aware``       padding-aware mode: how far each output is from the official one, per stage, and why
``matching``    pairing instances by (query, label) or by mask IoU
``endtoend``    ``maskdino convert`` + ``load_model`` + ``ImagePredictor`` vs the official evaluation path
``losses``      matcher, losses and gradients of both criteria on the same outputs
``latency``     like-for-like latency, per allocator setting in its own process, per stage
``record``      record the official outputs that ``test_official_parity.py`` checks in CI
``cli``         the command line
==============  ===============================================================================================
"""
