"""Whole kept input columns (or output rows) of S: standard ops on a smaller dense matrix, fast on every provider."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from sslc_export.errors import UserError
from sslc_export.onnx.formats.base import Layout, Subgraph, has_low_rank
from sslc_export.onnx.formats.dense import add_low_rank
from sslc_export.onnx.formats.joined import add_joined

if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors


def kept_lines(mask: np.ndarray) -> tuple[str, np.ndarray]:
    """Which whole input columns (or output rows) of a structured S survive."""
    columns = mask.any(0)
    if (mask[:, columns].all()) and mask.sum() == columns.sum() * mask.shape[0]:
        return "columns", np.flatnonzero(columns)
    rows = mask.any(1)
    if mask[rows].all() and mask.sum() == rows.sum() * mask.shape[1]:
        return "rows", np.flatnonzero(rows)
    raise UserError("the structured format needs whole kept columns or rows: compress with --pattern structured")


class StructuredLayout(Layout):
    """Kept columns: Gather them and one MatMul on [x_kept, x·Vᵀ] with [S_keptᵀ; Uᵀ]. Kept rows: a
    smaller MatMul whose outputs are scattered into the low-rank output."""

    name = "structured"
    summary = "Gather of kept input columns (or rows) + one smaller dense MatMul"
    patterns = ("structured",)

    def build(self, graph: Subgraph, x: str, output: str, layer: CompressedTensors, bits: int) -> None:
        axis, kept = kept_lines(layer.mask.numpy())
        sparse = layer.sparse.numpy()
        if axis == "columns":
            x_kept = graph.op("Gather", [x, graph.constant("kept_columns", kept.astype(np.int64))], None, "x_kept", axis=-1)
            add_joined(graph, x, x_kept, layer.sparse[:, torch.from_numpy(kept)], layer, output)
            return
        if not has_low_rank(layer):
            raise UserError("structured rows without a low-rank part is not supported: use --pattern structured --axis columns")
        partial = graph.matmul(x, sparse[kept].T, None, "S_rows")
        low = add_low_rank(graph, x, layer)
        rows = graph.constant("kept_rows", kept.astype(np.int64))
        picked = graph.op("Gather", [low, rows], None, "low_rank_rows", axis=-1)
        updated = graph.op("Add", [picked, partial], None, "rows_sum")
        shape = graph.op("Shape", [updated], None, "rows_shape")
        expanded = graph.op("Expand", [rows, shape], None, "rows_index")
        graph.op("ScatterElements", [low, expanded, updated], output, "scatter", axis=-1)
