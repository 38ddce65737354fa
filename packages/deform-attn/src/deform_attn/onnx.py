"""ONNX translation of ``torch.ops.deform_attn.ms_deform_attn`` into standard ONNX operators.

``torch.onnx.export(..., dynamo=True)`` has no translation for our custom op; pass the table returned by
:func:`translation_table` as ``custom_translation_table`` and the exported graph holds only standard
(default-domain) ONNX operators, so onnxruntime, OpenVINO and TensorRT read it without a plugin::

    import torch
    import deform_attn.onnx

    onnx_program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        custom_translation_table=deform_attn.onnx.translation_table("grid_sample"),  # or "gather"
        dynamic_shapes=...,  # optional: batch, queries and feature-map sizes may be dynamic
    )
    onnx_program.save("model.onnx")

Two forms:

* ``"grid_sample"``: one ``GridSample`` (bilinear, zeros padding, align_corners=0; opset >= 16) per level,
  as the pure-PyTorch reference does. The number of levels must be static (it is a model constant).
* ``"gather"``: the bilinear interpolation written out with ``Gather`` + arithmetic + ``MatMul``, no
  ``GridSample`` (TensorRT is reported to miscompile the GridSample form of this op, NVIDIA/TensorRT#4813).
  All levels are processed together, so nothing but the tensor ranks is static.
* ``"custom"``: one node ``MSDeformAttn`` of domain ``deform_attn`` (not a standard operator), which OpenVINO
  runs with this package's own CPU kernels once the library of :mod:`deform_attn.openvino` is added to its
  ``Core``; float32. Inside the R50 Mask DINO the decompositions' sampling nodes take 6-9x the op's time
  (onnxruntime, 320x480 to 800x1216). onnxruntime cannot run it.

The standard forms read the level table at run time from the ``spatial_shapes`` / ``level_start_index`` inputs, so
batch, query count and feature-map sizes export dynamically. They follow grid_sample's arithmetic, NaN
propagation included. A 16-bit value with float32 locations (the op's mixed form) is computed in float32
and the output cast back to the value's dtype.

onnx / onnxscript are imported only when :func:`translation_table` is called: ``import deform_attn`` never
needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CUSTOM_DOMAIN", "CUSTOM_OP_TYPE", "METHODS", "STANDARD_METHODS", "translation_table"]

#: the forms in standard ONNX operators (any runtime), and all forms
STANDARD_METHODS = ("grid_sample", "gather")
METHODS = (*STANDARD_METHODS, "custom")
#: domain and type of the "custom" form's node, opset version 1 (OpenVINO runs it with ``deform_attn.openvino``)
CUSTOM_DOMAIN = "deform_attn"
CUSTOM_OP_TYPE = "MSDeformAttn"


def _opset_version(default: int = 20) -> int:
    """The opset the exporter is building (GridSample spells bilinear "bilinear" before opset 20 and
    "linear" from 20 on)."""
    try:
        import onnxscript.evaluator

        recorder = onnxscript.evaluator.default()
        return int(recorder.opset.version)  # type: ignore[attr-defined]  # torch's OpRecorder
    except Exception:  # not under the exporter, or another onnxscript layout
        return default


def _make_functions(op: Any) -> dict[str, Callable]:
    """The two translations, written with the onnxscript opset ``op`` (traced by the exporter)."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    i64 = TensorProto.INT64

    def const(values: list[int]) -> Any:
        """A 1-D int64 constant."""
        return op.Constant(value=helper.make_tensor("c", i64, [len(values)], values))

    def dim(x: Any, i: int) -> Any:
        """Dimension i of x as a 1-element int64 tensor."""
        return op.Shape(x, start=i, end=i + 1)

    def to_float(value: Any, locations: Any) -> tuple[Any, Any]:
        """(value in the locations' float dtype, value's original dtype or None) for the mixed form."""
        vt, lt = getattr(value, "dtype", None), getattr(locations, "dtype", None)
        if vt is not None and lt is not None and vt != lt:
            return op.Cast(value, to=f32), vt
        return value, None

    def restore(out: Any, dtype: Any) -> Any:
        return out if dtype is None else op.Cast(out, to=int(dtype))

    def ms_deform_attn_grid_sample(
        value: Any,
        spatial_shapes: Any,
        level_start_index: Any,
        sampling_locations: Any,
        attention_weights: Any,
        im2col_step: int = 64,
    ) -> Any:
        """value (N, S, M, D), locations (N, Q, M, L, P, 2), weights (N, Q, M, L, P) -> (N, Q, M * D)."""
        value, orig = to_float(value, sampling_locations)
        shape = sampling_locations.shape
        num_levels = shape[3] if shape is not None else None
        if not isinstance(num_levels, int):
            raise ValueError(
                "deform_attn.onnx: the grid_sample form needs a static number of levels (dim 3 of "
                f"sampling_locations), got {num_levels!r}; use translation_table('gather')"
            )
        mode = "linear" if _opset_version() >= 20 else "bilinear"
        n, m, d = dim(value, 0), dim(value, 2), dim(value, 3)
        q, p = dim(sampling_locations, 1), dim(sampling_locations, 4)
        minus1 = const([-1])
        # (N, S, M, D) -> (N, M, D, S): one transpose for all levels, then per-level slices on the last axis.
        value_t = op.Transpose(value, perm=[0, 2, 3, 1])
        grids = op.Sub(
            op.Mul(sampling_locations, op.CastLike(op.Constant(value_float=2.0), sampling_locations)),
            op.CastLike(op.Constant(value_float=1.0), sampling_locations),
        )
        # (N, Q, M, L, P, 2) -> (N, M, L, Q, P, 2)
        grids = op.Transpose(grids, perm=[0, 2, 3, 1, 4, 5])
        sampled = []
        for lvl in range(num_levels):
            hw = op.Gather(spatial_shapes, const([lvl]), axis=0)  # (1, 2)
            h = op.Reshape(op.Slice(hw, const([0]), const([1]), const([1])), minus1)
            w = op.Reshape(op.Slice(hw, const([1]), const([2]), const([1])), minus1)
            start = op.Gather(level_start_index, const([lvl]), axis=0)
            end = op.Add(start, op.Mul(h, w))
            v = op.Slice(value_t, start, end, const([3]))  # (N, M, D, H*W)
            v = op.Reshape(v, op.Concat(minus1, d, h, w, axis=0))  # (N*M, D, H, W)
            g = op.Gather(grids, const([lvl]), axis=2)  # (N, M, 1, Q, P, 2)
            g = op.Reshape(g, op.Concat(minus1, q, p, const([2]), axis=0))  # (N*M, Q, P, 2)
            sampled.append(
                op.GridSample(v, g, mode=mode, padding_mode="zeros", align_corners=0)
            )  # (N*M, D, Q, P)
        stacked = op.Concat(*sampled, axis=-1) if num_levels > 1 else sampled[0]  # (N*M, D, Q, L*P)
        weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])  # (N, M, Q, L, P)
        lp = op.Mul(dim(attention_weights, 3), p)
        weights = op.Reshape(weights, op.Concat(minus1, const([1]), q, lp, axis=0))  # (N*M, 1, Q, L*P)
        weights = op.CastLike(weights, stacked)
        out = op.ReduceSum(op.Mul(stacked, weights), const([-1]), keepdims=0)  # (N*M, D, Q)
        out = op.Reshape(out, op.Concat(n, op.Mul(m, d), q, axis=0))
        return restore(op.Transpose(out, perm=[0, 2, 1]), orig)  # (N, Q, M*D)

    def ms_deform_attn_gather(
        value: Any,
        spatial_shapes: Any,
        level_start_index: Any,
        sampling_locations: Any,
        attention_weights: Any,
        im2col_step: int = 64,
    ) -> Any:
        """Bilinear sampling as Gather + arithmetic, all levels at once (see the module docstring)."""
        value, orig = to_float(value, sampling_locations)
        n, s, m, d = dim(value, 0), dim(value, 1), dim(value, 2), dim(value, 3)
        q = dim(sampling_locations, 1)
        minus1 = const([-1])
        one = op.CastLike(op.Constant(value_float=1.0), sampling_locations)
        half = op.CastLike(op.Constant(value_float=0.5), sampling_locations)
        # Rows of all (n, m) heads with one zero row appended per head (index S): corners outside the map
        # read it, so they contribute exactly 0 as in grid_sample (no clamped reads of real rows).
        v = op.Transpose(value, perm=[0, 2, 1, 3])  # (N, M, S, D)
        v = op.Pad(v, const([0, 0, 0, 0, 0, 0, 1, 0]))  # (N, M, S+1, D)
        v = op.Reshape(v, op.Concat(minus1, d, axis=0))  # (N*M*(S+1), D)
        # Level table broadcast over (N, M, Q, L, P): (L, 1).
        hs = op.Cast(op.Reshape(op.Gather(spatial_shapes, const([0]), axis=1), const([-1, 1])), to=f32)
        ws = op.Cast(op.Reshape(op.Gather(spatial_shapes, const([1]), axis=1), const([-1, 1])), to=f32)
        starts = op.Cast(op.Reshape(level_start_index, const([-1, 1])), to=f32)
        hs, ws, starts = (op.CastLike(t, sampling_locations) for t in (hs, ws, starts))
        loc = op.Transpose(sampling_locations, perm=[0, 2, 1, 3, 4, 5])  # (N, M, Q, L, P, 2)
        x = op.Squeeze(op.Gather(loc, const([0]), axis=5), const([5]))  # (N, M, Q, L, P)
        y = op.Squeeze(op.Gather(loc, const([1]), axis=5), const([5]))
        ix = op.Sub(op.Mul(x, ws), half)
        iy = op.Sub(op.Mul(y, hs), half)
        x0, y0 = op.Floor(ix), op.Floor(iy)
        # grid_sample's weights: (x0 + 1 - ix), (ix - x0); NaN / inf coordinates make them NaN.
        wx = [op.Sub(op.Add(x0, one), ix), op.Sub(ix, x0)]
        wy = [op.Sub(op.Add(y0, one), iy), op.Sub(iy, y0)]
        zero = op.CastLike(op.Constant(value_float=0.0), sampling_locations)
        s_f = op.CastLike(op.Cast(s, to=f32), sampling_locations)
        # Flat row of (n, m, position): head b = n * M + m has rows [b * (S+1), (b+1) * (S+1)).
        nm = op.Mul(n, m)
        heads = op.Range(op.Constant(value_int=0), op.Squeeze(nm), op.Constant(value_int=1))  # (N*M,)
        heads = op.Reshape(heads, op.Concat(n, m, const([1, 1, 1]), axis=0))  # (N, M, 1, 1, 1)
        head_base = op.Mul(heads, op.Add(op.Squeeze(s), op.Constant(value_int=1)))
        idx, wts = [], []
        a = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])  # (N, M, Q, L, P)
        for cy in (0, 1):
            for cx in (0, 1):
                xc = op.Add(x0, op.CastLike(op.Constant(value_float=float(cx)), ix))
                yc = op.Add(y0, op.CastLike(op.Constant(value_float=float(cy)), iy))
                inside = op.And(
                    op.And(op.GreaterOrEqual(xc, zero), op.Less(xc, ws)),
                    op.And(op.GreaterOrEqual(yc, zero), op.Less(yc, hs)),
                )  # false for NaN
                pos = op.Where(inside, op.Add(starts, op.Add(op.Mul(yc, ws), xc)), s_f)
                idx.append(op.Add(op.Cast(pos, to=i64), head_base))
                wts.append(op.Mul(op.Mul(wx[cx], wy[cy]), a))
        # (N, M, Q, 4 * L * P): the corners of all samples, and their weights (times the attention weight).
        shape4 = op.Concat(n, m, q, minus1, axis=0)
        idx = op.Concat(*[op.Reshape(t, shape4) for t in idx], axis=3)
        wts = op.Concat(*[op.Reshape(t, shape4) for t in wts], axis=3)
        gathered = op.Gather(v, idx, axis=0)  # (N, M, Q, 4*L*P, D)
        wts = op.CastLike(op.Unsqueeze(wts, const([3])), gathered)  # (N, M, Q, 1, 4*L*P)
        out = op.MatMul(wts, gathered)  # (N, M, Q, 1, D)
        out = op.Transpose(op.Squeeze(out, const([3])), perm=[0, 2, 1, 3])  # (N, Q, M, D)
        return restore(op.Reshape(out, op.Concat(n, q, op.Mul(m, d), axis=0)), orig)

    from onnx.defs import OpSchema
    from onnxscript import values

    param = OpSchema.FormalParameter
    schema = OpSchema(
        CUSTOM_OP_TYPE,
        CUSTOM_DOMAIN,
        1,
        inputs=[
            param("value", "T"),
            param("spatial_shapes", "tensor(int64)"),
            param("level_start_index", "tensor(int64)"),
            param("sampling_locations", "T"),
            param("attention_weights", "T"),
        ],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32")],
    )
    custom_node = values.Op(values.Opset(CUSTOM_DOMAIN, 1), CUSTOM_OP_TYPE, schema)

    def ms_deform_attn_custom(
        value: Any,
        spatial_shapes: Any,
        level_start_index: Any,
        sampling_locations: Any,
        attention_weights: Any,
        im2col_step: int = 64,
    ) -> Any:
        """One ``deform_attn::MSDeformAttn`` node (float32), for runtimes given ``deform_attn.openvino``."""
        value, orig = to_float(value, sampling_locations)
        out = custom_node(
            value,
            op.Cast(spatial_shapes, to=i64),
            op.Cast(level_start_index, to=i64),
            sampling_locations,
            attention_weights,
        )
        return restore(out, orig)

    return {
        "grid_sample": ms_deform_attn_grid_sample,
        "gather": ms_deform_attn_gather,
        "custom": ms_deform_attn_custom,
    }


def translation_table(method: str = "grid_sample") -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: maps
    ``torch.ops.deform_attn.ms_deform_attn.default`` to its ONNX translation.

    Args:
        method: ``"grid_sample"`` (GridSample per level, opset >= 16), ``"gather"`` (Gather + arithmetic,
            no GridSample) or ``"custom"`` (one ``MSDeformAttn`` node of domain ``deform_attn``: not standard ONNX,
            OpenVINO runs it with the extension of :mod:`deform_attn.openvino`).

    Returns:
        ``{torch.ops.deform_attn.ms_deform_attn.default: function}``; empty when the compiled op is not
        available (the model then runs the pure-PyTorch path, which exports as is).

    Raises:
        ValueError: unknown method.
        ImportError: onnxscript is not installed.
    """
    if method not in METHODS:
        raise ValueError(f"deform_attn.onnx: method must be one of {METHODS}, got {method!r}")
    from . import ops

    try:
        from onnxscript import opset18 as op
    except ImportError as exc:
        raise ImportError("deform_attn.onnx needs onnxscript (and onnx): pip install onnxscript") from exc
    if not ops.extension_available():
        return {}
    return {torch.ops.deform_attn.ms_deform_attn.default: _make_functions(op)[method]}
