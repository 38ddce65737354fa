"""The comparison report: one row per check, the tensor difference measures, JSON output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Report", "Row", "tensor_diff"]


@dataclass
class Row:
    """One line of the report.

    ``status``: ``ok``, ``tie`` (ok after aligning a two-stage top-k near tie), ``FAIL``, or ``info`` (a measured
    difference that is expected, e.g. padding-aware mode against the official code, with its explanation).
    ``values``: the numbers behind ``detail`` (for ``--json``).
    """

    section: str
    name: str
    status: str
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


def tensor_diff(ours: Tensor, ref: Tensor, atol: float) -> tuple[bool, str, dict[str, Any]]:
    """``(within tolerance, description, values)``; tolerance: ``max|ours - ref| <= atol * max|ref|``.

    Values: ``max_abs``, ``ref_max`` (``max|ref|``), ``rel_of_max`` (their ratio) and ``max_rel`` (elementwise
    ``|d| / (|ref| + 1e-3 max|ref|)``).
    """
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != b.shape:
        return False, f"shape mismatch: ours {tuple(a.shape)} vs official {tuple(b.shape)}", {}
    if a.numel() == 0:
        return True, f"empty {tuple(a.shape)}", {}
    d = (a - b).abs()
    max_abs, scale = float(d.max()), max(float(b.abs().max()), 1e-12)
    rel = float((d / (b.abs() + 1e-3 * scale)).max())
    ok = bool(torch.isfinite(a).all()) and max_abs <= atol * scale
    values = {"max_abs": max_abs, "ref_max": scale, "rel_of_max": max_abs / scale, "max_rel": rel}
    detail = (
        f"max_abs={max_abs:.2e} |ref|max={scale:.2e} abs/|ref|max={max_abs / scale:.2e} max_rel={rel:.2e} "
        f"{tuple(a.shape)}"
    )
    return ok, detail, values


@dataclass
class Report:
    """Collects, prints and saves the rows."""

    atol: float
    rows: list[Row] = field(default_factory=list)

    def add(self, section: str, name: str, ok: bool | None, detail: str, **values: Any) -> Row:
        """A row: ``ok`` True/False, or None for ``info``."""
        row = Row(section, name, "info" if ok is None else ("ok" if ok else "FAIL"), detail, values)
        self.rows.append(row)
        return row

    def tensor(
        self, section: str, name: str, ours: Tensor | None, ref: Tensor | None, info: bool = False
    ) -> Row:
        """Compare ``ours`` with the official ``ref``; ``info``: report the difference without a verdict."""
        if ours is None or ref is None:
            if ours is None and ref is None:
                return self.add(section, name, None, "absent on both sides")
            which = "ours" if ours is None else "official"
            return self.add(section, name, None, f"absent in {which} only (not computed in eval mode)")
        ok, detail, values = tensor_diff(ours, ref, self.atol)
        return self.add(section, name, None if info else ok, detail, **values)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def print(self, rows: Sequence[Row] | None = None) -> None:
        rows = self.rows if rows is None else rows
        width = max((len(f"{r.section} {r.name}") for r in rows), default=0)
        for r in rows:
            print(f"  {(r.section + ' ' + r.name).ljust(width)}  {r.status:<4}  {r.detail}")

    def save_json(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """The rows (and ``extra``, e.g. latency results) as JSON."""
        data = {"atol": self.atol, "rows": [asdict(r) for r in self.rows], **(extra or {})}
        path.write_text(json.dumps(data, indent=1, default=str))
