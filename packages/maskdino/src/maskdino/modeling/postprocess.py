"""Per-image inference post-processing of Mask DINO: instance, panoptic and semantic outputs.

Pure functions on one image's head outputs, following the official ``maskdino/maskdino.py``
(``instance_inference``, ``panoptic_inference``, ``semantic_inference``) operation by operation, so
that the same weights give the same results. Inputs:

* ``class_logits`` ``(Q, C)`` for focal-loss models (COCO instance / panoptic), ``(Q, C+1)`` with a
  trailing "no object" column for softmax-CE models (``focal=False``, the ADE20K semantic model).
* ``mask_logits`` ``(Q, H, W)`` already resized to the output resolution with
  :func:`resize_mask_logits` (the official code resizes before inference whenever the instance or
  panoptic task is on).

:func:`postprocess_image` runs the three tasks from the 1/4-resolution head outputs and resizes only
the queries a task needs (bilinear interpolation is per channel, so this is exact and saves most of the
memory and time of resizing 300 full-resolution masks).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_core.postprocess import topk_query_class

from ..structures import Instances, PanopticSegmentation, Prediction

if TYPE_CHECKING:
    from ..config.model import MaskDINOConfig

__all__ = [
    "TASKS",
    "MaskDINOPostProcessor",
    "boxes_to_output_size",
    "instance_inference",
    "panoptic_inference",
    "postprocess_image",
    "resize_mask_logits",
    "semantic_inference",
]


def resize_mask_logits(
    mask_logits: Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> Tensor:
    """Bring low-resolution mask logits to the output resolution, as detectron2 does.

    Bilinear (``align_corners=False``) to the padded input size, crop the top-left ``image_size``
    (the unpadded, resized input), then bilinear to ``output_size`` (the original image size).

    Args:
        mask_logits: ``(Q, h, w)`` logits predicted on the padded batch (usually at 1/4 resolution).
        padded_size: ``(Hp, Wp)`` of the padded batch tensor.
        image_size: ``(h_img, w_img)`` of this image inside the padded batch.
        output_size: ``(H0, W0)`` wanted output size.

    Returns:
        ``(Q, H0, W0)`` logits, same dtype as the input.
    """
    hp, wp = int(padded_size[0]), int(padded_size[1])
    hi, wi = int(image_size[0]), int(image_size[1])
    ho, wo = int(output_size[0]), int(output_size[1])
    if hi > hp or wi > wp:
        raise ValueError(f"image_size {image_size} does not fit in padded_size {padded_size}")
    if mask_logits.shape[0] == 0:  # F.interpolate rejects empty inputs
        return mask_logits.new_zeros((0, ho, wo))
    x = mask_logits[None]
    if x.shape[-2:] != (hp, wp):
        x = F.interpolate(x, size=(hp, wp), mode="bilinear", align_corners=False)
    x = x[..., :hi, :wi]
    if (hi, wi) != (ho, wo):
        x = F.interpolate(x, size=(ho, wo), mode="bilinear", align_corners=False)
    return x[0]


def boxes_to_output_size(
    boxes_cxcywh: Tensor,
    box_frame: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> Tensor:
    """Normalised ``(cx, cy, w, h)`` boxes -> absolute ``xyxy`` at the output size.

    The boxes are normalised to ``box_frame``: the padded input for the official model (its ``box_postprocess``
    scales by ``padded / image * output`` per axis), the image itself for a padding-aware model (the scale is then
    just the output size). Boxes are not clipped to the image, as in the official post-processing.

    Args:
        boxes_cxcywh: ``(Q, 4)`` in ``[0, 1]`` relative to ``box_frame``.
        box_frame: ``(h, w)`` the boxes are normalised to. image_size: ``(h, w)`` of the image in the input batch.
        output_size: ``(H0, W0)`` wanted output size.

    Returns:
        ``(Q, 4)`` ``(x0, y0, x1, y1)`` in output pixels.
    """
    if tuple(box_frame) == tuple(image_size):
        sh, sw = float(output_size[0]), float(output_size[1])
    else:
        sh = box_frame[0] / image_size[0] * output_size[0]
        sw = box_frame[1] / image_size[1] * output_size[1]
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
    scale = torch.tensor([sw, sh, sw, sh], dtype=xyxy.dtype, device=xyxy.device)
    return xyxy * scale


def _class_probs(class_logits: Tensor, focal: bool) -> Tensor:
    """``(Q, C)`` per-class probabilities: sigmoid (focal) or softmax without the no-object column."""
    if focal:
        return class_logits.sigmoid()
    return class_logits.softmax(-1)[:, :-1]


def _topk_instances(
    class_logits: Tensor, top_k: int, focal: bool, thing_classes: Collection[int] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k over (query, class) pairs: returns ``(scores (K,), labels (K,), query_idx (K,))``."""
    probs = _class_probs(class_logits, focal)
    scores, labels, query_idx = topk_query_class(probs, min(int(top_k), probs.numel()))
    if thing_classes is not None:
        # With panoptic training the official keeps only thing classes among the instances.
        things = torch.as_tensor(sorted(thing_classes), dtype=labels.dtype, device=labels.device)
        keep = torch.isin(labels, things)
        scores, labels, query_idx = scores[keep], labels[keep], query_idx[keep]
    return scores, labels, query_idx


def _binary_masks_and_quality(
    mask_logits: Tensor,
    resize: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 4,
    rows: Sequence[int] | None = None,
    num_rows: int | None = None,
    store_masks: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """Binary masks ``logit > 0`` and the mean mask probability inside them, a few queries at a time.

    Args:
        mask_logits: ``(U, h, w)``; resized by ``resize`` (if given) chunk by chunk.
        chunk: queries per step: a few full-resolution masks stay in cache through resize, threshold,
            sigmoid and sum (about 2x less CPU time than whole-stack passes at 800x1216).
        rows: output row of each of the ``U`` masks (default ``0..U-1``); with ``num_rows`` rows in all, the
            rows not listed are left uninitialised for the caller to fill.
        store_masks: False computes the qualities only (no ``(num_rows, H, W)`` output is allocated; None is
            returned for the masks).

    Returns:
        ``masks (num_rows, H, W)`` bool (or None) and ``quality (U,)``; an empty mask has quality 0 (the official
        ``+ 1e-6``).
    """
    u = mask_logits.shape[0]
    rows = list(range(u)) if rows is None else list(rows)
    num_rows = u if num_rows is None else num_rows
    masks: Tensor | None = None
    ones: Tensor | None = None
    quality = mask_logits.new_empty(u, dtype=torch.float32)
    for start in range(0, u, chunk):
        stop = min(start + chunk, u)
        logits = mask_logits[start:stop]
        logits = resize(logits) if resize is not None else logits.clone()
        n = logits.shape[0]
        if store_masks:
            if masks is None:
                masks = torch.empty((num_rows, *logits.shape[-2:]), dtype=torch.bool, device=logits.device)
            out_rows = rows[start:stop]
            if out_rows == list(range(out_rows[0], out_rows[0] + n)):
                torch.gt(logits, 0, out=masks[out_rows[0] : out_rows[0] + n])
            else:  # straight into each (non-adjacent) output row: no reordering copy of the full-size masks
                for i, r in enumerate(out_rows):
                    torch.gt(logits[i], 0, out=masks[r])
        # The mask again as 0/1 floats, in one buffer reused by every chunk: summing a bool tensor (or
        # multiplying by it) converts it into a fresh int64/float copy each time, which cost more than all the
        # rest here. A float sum of 0/1 is exact (< 2^24 pixels per mask), so the values are the same.
        if ones is None or ones.shape[1:] != logits.shape[1:]:
            ones = torch.empty((min(chunk, u), *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
        fg = torch.gt(logits, 0, out=ones[:n])
        inside = logits.sigmoid_().mul_(fg).flatten(1).sum(1)
        quality[start:stop] = inside / (fg.flatten(1).sum(1) + 1e-6)
    if masks is None and store_masks:  # no query at all
        h, w = mask_logits.shape[-2:] if resize is None else resize(mask_logits[:0]).shape[-2:]
        masks = torch.zeros((num_rows, h, w), dtype=torch.bool, device=mask_logits.device)
    return masks, quality


def _instances(
    scores: Tensor,
    labels: Tensor,
    query_idx: Tensor,
    mask_logits: Tensor,
    boxes: Tensor,
    resize: Callable[[Tensor], Tensor] | None = None,
    score_threshold: float | None = None,
    chunk: int = 4,
) -> Instances:
    """Instances of the selected (query, class) pairs: masks and mask-quality rescoring per DISTINCT query.

    With ``score_threshold``, instances whose final score is below it are dropped before any of their masks is
    stored: a first pass computes only the mask qualities, the second makes the masks of the kept instances.
    """
    # A query selected for several classes is resized and scored once, into the row of its first occurrence;
    # its later rows copy that mask.
    first: dict[int, int] = {}
    source = [first.setdefault(q, k) for k, q in enumerate(query_idx.tolist())]
    distinct = list(first.values())  # rows of first occurrences, ascending
    slot = {row: i for i, row in enumerate(distinct)}
    if score_threshold is not None:
        _, quality_distinct = _binary_masks_and_quality(
            mask_logits[query_idx[distinct]], resize, chunk=chunk, store_masks=False
        )
        quality = quality_distinct[[slot[src] for src in source]] if source else quality_distinct
        keep = (scores * quality.to(scores.dtype)) >= score_threshold
        return _instances(
            scores[keep], labels[keep], query_idx[keep], mask_logits, boxes, resize, None, chunk
        )
    masks, quality_distinct = _binary_masks_and_quality(
        mask_logits[query_idx[distinct]], resize, chunk=chunk, rows=distinct, num_rows=len(source)
    )
    assert masks is not None
    for k, src in enumerate(source):
        if src != k:
            masks[k].copy_(masks[src])
    quality = quality_distinct[[slot[src] for src in source]] if source else quality_distinct
    return Instances(
        boxes=boxes[query_idx],
        scores=scores * quality.to(scores.dtype),
        labels=labels.long(),
        masks=masks,
    )


def instance_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    boxes_xyxy: Tensor,
    top_k: int = 100,
    focal: bool = True,
    thing_classes: Collection[int] | None = None,
) -> Instances:
    """Instance segmentation output of one image.

    The ``top_k`` best (query, class) pairs of the class probabilities are kept, so one query can give
    several instances with different labels. Mask = ``logit > 0``; score = class probability x mean
    mask probability inside the mask; box = the box head's box of that query.

    Args:
        class_logits: ``(Q, C)`` (focal) or ``(Q, C+1)`` (``focal=False``).
        mask_logits: ``(Q, H, W)`` at the output resolution.
        boxes_xyxy: ``(Q, 4)`` absolute ``xyxy`` at the output resolution (see :func:`boxes_to_output_size`).
        top_k: number of (query, class) pairs kept (official ``TEST_TOPK_PER_IMAGE`` 100).
        focal: sigmoid class probabilities; False = softmax over C+1 with the last column dropped.
        thing_classes: if given (panoptic models), instances of other classes are dropped after top-k.

    Returns:
        :class:`Instances` sorted by decreasing class probability (before mask rescoring).
    """
    scores, labels, query_idx = _topk_instances(class_logits, top_k, focal, thing_classes)
    return _instances(scores, labels, query_idx, mask_logits, boxes_xyxy)


def _panoptic_keep(
    class_logits: Tensor, object_mask_threshold: float, temperature: float | None, focal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Which queries enter the panoptic merge, with their scores and labels: ``(keep (Q,), scores, labels)``."""
    if focal:
        probs = class_logits.sigmoid()
        scores, labels = probs.max(-1)
        keep = scores > object_mask_threshold
        if temperature is not None:
            # Official PANO_TRANSFORM_EVAL: sharpen the sigmoid scores into a softmax AFTER thresholding.
            scores, labels = (probs / temperature).softmax(-1).max(-1)
    else:
        num_classes = class_logits.shape[-1] - 1
        scores, labels = class_logits.softmax(-1).max(-1)
        keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    return keep, scores, labels


def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    thing_classes: Collection[int],
    object_mask_threshold: float = 0.25,
    overlap_threshold: float = 0.8,
    temperature: float | None = 0.06,
    focal: bool = True,
) -> PanopticSegmentation:
    """Panoptic segmentation output of one image (the Mask2Former / Mask DINO merge).

    Queries whose best class probability exceeds ``object_mask_threshold`` are kept; each pixel goes to
    the kept query with the largest ``score * sigmoid(mask)``; a query's segment is its argmax pixels
    where its own mask probability is >= 0.5. A segment is dropped when empty or when
    ``argmax area / area(mask prob >= 0.5) < overlap_threshold`` (it lost too much to other queries);
    the segments of one stuff class are merged into the first one. Segment ids count from 1 in query
    order; 0 = void.

    Args:
        class_logits: ``(Q, C)`` (focal) or ``(Q, C+1)``.
        mask_logits: ``(Q, H, W)`` at the output resolution.
        thing_classes: contiguous ids of thing classes (the others are stuff).
        object_mask_threshold: class-probability threshold (official 0.25 for COCO).
        overlap_threshold: minimum kept-area ratio (official 0.8).
        temperature: focal models only: scores/labels = ``softmax(sigmoid(logits) / temperature)``
            (official ``PANO_TEMPERATURE`` 0.06); ``None`` keeps the sigmoid scores.
        focal: False = softmax-CE model with a no-object column (those queries are never kept).

    Returns:
        :class:`PanopticSegmentation` with ``segments`` ``(H, W)`` int32.
    """
    h, w = mask_logits.shape[-2:]
    device = mask_logits.device
    keep, scores, labels = _panoptic_keep(class_logits, object_mask_threshold, temperature, focal)
    segments = torch.zeros((h, w), dtype=torch.int32, device=device)
    if not bool(keep.any()):
        return PanopticSegmentation(segments, [])
    cur_scores = scores[keep]
    cur_labels = labels[keep]
    cur_masks = mask_logits[keep].sigmoid()
    num = cur_masks.shape[0]
    cur_ids = (cur_scores.view(-1, 1, 1).to(cur_masks.dtype) * cur_masks).argmax(0)  # (H, W)
    # A pixel can only be in the segment of its own argmax query k, and is so iff mask_k >= 0.5 there:
    # the per-query masks are disjoint, so painting order never matters and areas are bincounts.
    own_prob = cur_masks.gather(0, cur_ids[None])[0]
    inside = own_prob >= 0.5
    argmax_area = torch.bincount(cur_ids.flatten(), minlength=num).tolist()
    original_area = (cur_masks >= 0.5).flatten(1).sum(1).tolist()
    final_area = torch.bincount(cur_ids[inside], minlength=num).tolist()
    thing_set = {int(c) for c in thing_classes}

    lut = torch.zeros(num + 1, dtype=torch.int32)  # query k -> segment id (0 = dropped)
    segments_info: list[dict] = []
    stuff_segment: dict[int, int] = {}
    for k in range(num):
        if argmax_area[k] == 0 or original_area[k] == 0 or final_area[k] == 0:
            continue
        if argmax_area[k] / original_area[k] < overlap_threshold:
            continue
        label = int(cur_labels[k])
        isthing = label in thing_set
        if not isthing and label in stuff_segment:
            lut[k] = stuff_segment[label]
            continue
        seg_id = len(segments_info) + 1
        if not isthing:
            stuff_segment[label] = seg_id
        lut[k] = seg_id
        segments_info.append(
            {"id": seg_id, "category_id": label, "isthing": isthing, "score": float(cur_scores[k])}
        )
    segments = torch.where(inside, lut.to(device)[cur_ids], segments)
    return PanopticSegmentation(segments, segments_info)


def _semantic_class_probs(class_logits: Tensor, focal: bool, temperature: float | None) -> Tensor:
    """``(Q, C)`` class weights of the semantic sum (the softmax over classes needs the full row)."""
    if focal:
        cls = class_logits.sigmoid()
        return (cls / temperature).softmax(-1) if temperature is not None else cls
    return class_logits.softmax(-1)[:, :-1]


def semantic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    focal: bool = True,
    temperature: float | None = 0.06,
    class_probs: Tensor | None = None,
) -> Tensor:
    """Per-class semantic probabilities ``einsum('qc,qhw->chw', class_probs, sigmoid(masks))``.

    Args:
        class_logits: ``(Q, C)`` (focal) or ``(Q, C+1)`` (``focal=False``: softmax, no-object dropped).
        mask_logits: ``(Q, H, W)``.
        focal: sigmoid class probabilities, sharpened by ``softmax(p / temperature)`` unless
            ``temperature`` is None (official ``PANO_TRANSFORM_EVAL``).
        class_probs: precomputed ``(Q, C)`` class weights (overrides ``class_logits``).

    Returns:
        ``(C, H, W)`` float.
    """
    cls = class_probs if class_probs is not None else _semantic_class_probs(class_logits, focal, temperature)
    return torch.einsum("qc,qhw->chw", cls.to(mask_logits.dtype), mask_logits.sigmoid())


def postprocess_image(
    class_logits: Tensor,
    mask_logits: Tensor,
    boxes_cxcywh: Tensor | None,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    *,
    box_frame: tuple[int, int] | None = None,
    instance_on: bool = True,
    panoptic_on: bool = False,
    semantic_on: bool = False,
    focal: bool = True,
    top_k: int = 100,
    thing_classes: Collection[int] | None = None,
    object_mask_threshold: float = 0.25,
    overlap_threshold: float = 0.8,
    temperature: float | None = 0.06,
    semantic_resize_first: bool | None = None,
    semantic_chunk: int = 50,
    score_threshold: float | None = None,
) -> Prediction:
    """All requested tasks for one image from the head's low-resolution outputs.

    Equivalent to resizing every query's mask with :func:`resize_mask_logits` and calling the three
    task functions, but only the queries that a task uses are resized.

    Args:
        class_logits: ``(Q, C[+1])``.
        mask_logits: ``(Q, h, w)`` head mask logits (1/4 of the padded input).
        boxes_cxcywh: ``(Q, 4)`` normalised to ``box_frame``; required for instances.
        padded_size, image_size, output_size: as in :func:`resize_mask_logits`.
        box_frame: the ``(h, w)`` the boxes are normalised to (default ``padded_size``, the official model's; a
            padding-aware model's boxes are normalised to ``image_size``).
        thing_classes: thing ids; required for panoptic; with ``panoptic_on`` the instances keep only
            things, as the official code.
        semantic_resize_first: resize masks before the semantic einsum (official behaviour whenever
            instance or panoptic is on; default) or compute at padded size and resize the probabilities
            (official semantic-only behaviour).
        semantic_chunk: queries resized at a time for the semantic sum (bounds the peak memory).
        score_threshold: instances scoring below it are dropped before their masks are stored (None: keep all
            ``top_k``, as the official code).

    Memory: masks are resized to the output size a few queries at a time (fewer for large outputs: at most ~16M
    pixels per chunk), so the peak grows with the kept instances x output pixels, not with all queries.
    """
    resize: Callable[[Tensor], Tensor] = lambda x: resize_mask_logits(x, padded_size, image_size, output_size)  # noqa: E731
    pred = Prediction()
    if instance_on:
        if boxes_cxcywh is None:
            raise ValueError("instance inference needs boxes_cxcywh")
        things = thing_classes if panoptic_on else None
        scores, labels, query_idx = _topk_instances(class_logits, top_k, focal, things)
        frame = padded_size if box_frame is None else box_frame
        boxes = boxes_to_output_size(boxes_cxcywh, frame, image_size, output_size)
        pixels = int(output_size[0]) * int(output_size[1])
        chunk = max(1, min(4, 16_000_000 // max(pixels, 1)))
        pred.instances = _instances(
            scores, labels, query_idx, mask_logits, boxes, resize, score_threshold, chunk
        )
    if panoptic_on:
        if thing_classes is None:
            raise ValueError("panoptic inference needs thing_classes")
        keep, _, _ = _panoptic_keep(class_logits, object_mask_threshold, temperature, focal)
        # Only kept queries take part in the merge: resizing the others would change nothing.
        pred.panoptic = panoptic_inference(
            class_logits[keep],
            resize(mask_logits[keep]),
            thing_classes,
            object_mask_threshold=object_mask_threshold,
            overlap_threshold=overlap_threshold,
            temperature=temperature,
            focal=focal,
        )
    if semantic_on:
        if semantic_resize_first is None:
            semantic_resize_first = instance_on or panoptic_on
        hp, wp = padded_size

        def to_padded(x: Tensor) -> Tensor:
            if x.shape[-2:] == (hp, wp):
                return x
            return F.interpolate(x[None], size=(hp, wp), mode="bilinear", align_corners=False)[0]

        # Resize first (official whenever instance or panoptic is on) or sum at the padded size and resize
        # the class probabilities (official semantic-only path). Summed over query chunks: the full
        # (Q, H, W) stack of resized masks needs Q*H*W floats twice, over 2 GB for 300 queries at 800x1216.
        upsample = resize if semantic_resize_first else to_padded
        probs = _semantic_class_probs(class_logits, focal, temperature)
        sem = None
        for start in range(0, probs.shape[0], semantic_chunk):
            stop = start + semantic_chunk
            part = semantic_inference(
                class_logits[start:stop], upsample(mask_logits[start:stop]), class_probs=probs[start:stop]
            )
            sem = part if sem is None else sem.add_(part)
        if not semantic_resize_first and sem is not None:
            sem = resize_mask_logits(sem, padded_size, image_size, output_size)
        pred.semantic = sem
    return pred


TASKS = ("instance", "panoptic", "semantic")


class MaskDINOPostProcessor:
    """Per-image post-processing with a model's inference settings: the one implementation shared by the PyTorch
    model and the exported (ONNX / OpenVINO) backends.

    Args:
        focal: sigmoid class probabilities (False: softmax over ``C + 1``, no-object dropped).
        tasks: the tasks run by default (a subset of :data:`TASKS`).
        top_k: instances per image. thing_classes: contiguous ids of things (panoptic; instances of panoptic models).
        object_mask_threshold, overlap_threshold, temperature: of the panoptic merge (official TEST settings).
    """

    def __init__(
        self,
        *,
        focal: bool = True,
        tasks: Iterable[str] = ("instance",),
        top_k: int = 100,
        thing_classes: Collection[int] = (),
        object_mask_threshold: float = 0.25,
        overlap_threshold: float = 0.8,
        temperature: float | None = 0.06,
    ):
        self.focal = focal
        self.tasks = self.resolve_tasks(tasks, allow_empty=True)
        self.top_k = top_k
        self.thing_classes = frozenset(int(c) for c in thing_classes)
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: MaskDINOConfig) -> MaskDINOPostProcessor:
        inf = cfg.inference
        on = (inf.instance_on, inf.panoptic_on, inf.semantic_on)
        return cls(
            focal=not cfg.decoder.semantic_ce_loss,
            tasks=[t for t, flag in zip(TASKS, on) if flag],
            top_k=inf.test_topk_per_image,
            thing_classes=inf.thing_classes,
            object_mask_threshold=inf.object_mask_threshold,
            overlap_threshold=inf.overlap_threshold,
            temperature=inf.temperature,
        )

    def resolve_tasks(self, tasks: Iterable[str] | None, allow_empty: bool = False) -> frozenset[str]:
        """``tasks`` checked against :data:`TASKS`; None = the default tasks."""
        if tasks is None:
            return self.tasks
        chosen = frozenset(tasks)
        unknown = chosen - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
        if not chosen and not allow_empty:
            raise ValueError(f"no task chosen; expected a non-empty subset of {TASKS}")
        return chosen

    def __call__(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        boxes_cxcywh: Tensor,
        padded_size: tuple[int, int],
        image_size: tuple[int, int],
        output_size: tuple[int, int],
        box_frame: tuple[int, int] | None = None,
        tasks: Iterable[str] | None = None,
        score_threshold: float | None = None,
    ) -> Prediction:
        """:func:`postprocess_image` of one image's head outputs with these settings (``tasks``: default ours;
        ``score_threshold``: drop weaker instances before their masks are made)."""
        chosen = self.resolve_tasks(tasks)
        return postprocess_image(
            class_logits,
            mask_logits,
            boxes_cxcywh,
            padded_size,
            image_size,
            output_size,
            box_frame=box_frame,
            instance_on="instance" in chosen,
            panoptic_on="panoptic" in chosen,
            semantic_on="semantic" in chosen,
            focal=self.focal,
            top_k=self.top_k,
            thing_classes=self.thing_classes,
            object_mask_threshold=self.object_mask_threshold,
            overlap_threshold=self.overlap_threshold,
            temperature=self.temperature,
            score_threshold=score_threshold,
        )
