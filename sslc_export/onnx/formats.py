"""How one compressed Linear becomes ONNX nodes: y = x·Sᵀ + (x·Vᵀ)·Uᵀ (+ b), per format.

Each builder returns the nodes and initializers that replace one `MatMul(x, Wᵀ)`; the
rewrite stage splices them in where the MatMul was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sslc_export.checkpoint import CompressedTensors
from sslc_export.errors import UserError
from sslc_export.lowrank import balance


@dataclass
class Subgraph:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output


def _factors_t(layer: CompressedTensors) -> tuple[np.ndarray, np.ndarray]:
    """(Vᵀ, Uᵀ), balanced so that quantized formats keep every rank-1 term."""
    u, v = balance(layer.u, layer.v)
    return v.T.numpy(), u.T.numpy()


def _low_rank(graph: Subgraph, prefix: str, x: str, layer: CompressedTensors) -> str | None:
    if layer.u.shape[1] == 0:
        return None
    v_t_array, u_t_array = _factors_t(layer)
    v_t = graph.constant(f"{prefix}.V_T", v_t_array)
    u_t = graph.constant(f"{prefix}.U_T", u_t_array)
    hidden = graph.op("MatMul", [x, v_t], f"{prefix}/low_rank_in")
    return graph.op("MatMul", [hidden, u_t], f"{prefix}/low_rank_out")


def _sum(graph: Subgraph, prefix: str, terms: list[str | None], output: str) -> None:
    """Add the branch outputs into the node's original output name."""
    present = [t for t in terms if t is not None]
    if len(present) == 1:
        graph.op("Identity", present, output)
        return
    total = present[0]
    for i, term in enumerate(present[1:]):
        total = graph.op("Add", [total, term], output if i == len(present) - 2 else f"{prefix}/sum{i}")


def dense_format(prefix: str, x: str, output: str, layer: CompressedTensors) -> Subgraph:
    """S stored dense, zeros included: the reference every other format is checked against."""
    graph = Subgraph()
    s_t = graph.constant(f"{prefix}.S_T", layer.sparse.T.numpy())
    sparse = graph.op("MatMul", [x, s_t], f"{prefix}/sparse_out")
    _sum(graph, prefix, [sparse, _low_rank(graph, prefix, x, layer)], output)
    return graph


def _joined(graph: Subgraph, prefix: str, x: str, x_sparse: str, s_t: "np.ndarray", layer: CompressedTensors, output: str) -> None:
    """One MatMul for both branches: Concat[x_sparse, x·Vᵀ] @ [Sᵀ; Uᵀ]. Per Linear that is two MatMuls and a Concat
    instead of three MatMuls and an Add: at batch-1 decode a node costs about as much as its bytes."""
    if layer.u.shape[1] == 0:
        graph.op("MatMul", [x_sparse, graph.constant(f"{prefix}.S_T", s_t)], output)
        return
    v_t_array, u_t = _factors_t(layer)
    projected = graph.op("MatMul", [x, graph.constant(f"{prefix}.V_T", v_t_array)], f"{prefix}/low_rank_in")
    joined = graph.op("Concat", [x_sparse, projected], f"{prefix}/joined", axis=-1)
    graph.op("MatMul", [joined, graph.constant(f"{prefix}.SU_T", np.concatenate([s_t, u_t], axis=0))], output)


def joined_format(prefix: str, x: str, output: str, layer: CompressedTensors) -> Subgraph:
    """S stored dense like `dense`, but sharing one MatMul with Uᵀ (see _joined)."""
    graph = Subgraph()
    _joined(graph, prefix, x, x, layer.sparse.T.numpy(), layer, output)
    return graph


def nm_format(prefix: str, x: str, output: str, layer: CompressedTensors) -> Subgraph:
    """Same nodes as dense; S is N:M along the reduction axis, which TensorRT's sparse
    tensor cores pick up with trt_sparsity_enable. onnxruntime's own kernels see a dense MatMul."""
    return dense_format(prefix, x, output, layer)


def kept_lines(mask: np.ndarray) -> tuple[str, np.ndarray]:
    """Which whole input columns (or output rows) of a structured S survive."""
    columns = mask.any(0)
    if (mask[:, columns].all()) and mask.sum() == columns.sum() * mask.shape[0]:
        return "columns", np.flatnonzero(columns)
    rows = mask.any(1)
    if mask[rows].all() and mask.sum() == rows.sum() * mask.shape[1]:
        return "rows", np.flatnonzero(rows)
    raise UserError("the structured format needs whole kept columns or rows: compress with --pattern structured")


def structured_format(prefix: str, x: str, output: str, layer: CompressedTensors) -> Subgraph:
    """Kept input columns: one MatMul on [x_kept, x·Vᵀ] with the stacked weight [S_keptᵀ; Uᵀ],
    so the sparse and low-rank branches cost a single smaller dense MatMul.
    Kept output rows: a smaller MatMul whose outputs are scattered into the low-rank output."""
    graph = Subgraph()
    axis, kept = kept_lines(layer.mask.numpy())
    sparse = layer.sparse.numpy()
    if axis == "columns":
        indices = graph.constant(f"{prefix}.kept_columns", kept.astype(np.int64))
        x_kept = graph.op("Gather", [x, indices], f"{prefix}/x_kept", axis=-1)
        _joined(graph, prefix, x, x_kept, sparse[:, kept].T, layer, output)
        return graph
    weight = graph.constant(f"{prefix}.S_rows_T", sparse[kept].T)
    partial = graph.op("MatMul", [x, weight], f"{prefix}/sparse_rows")
    low = _low_rank(graph, prefix, x, layer)
    if low is None:
        raise UserError("structured rows without a low-rank part is not supported: use --pattern structured --axis columns")
    rows = graph.constant(f"{prefix}.kept_rows", kept.astype(np.int64))
    picked = graph.op("Gather", [low, rows], f"{prefix}/low_rank_rows", axis=-1)
    updated = graph.op("Add", [picked, partial], f"{prefix}/rows_sum")
    shape = graph.op("Shape", [updated], f"{prefix}/rows_shape")
    expanded = graph.op("Expand", [rows, shape], f"{prefix}/rows_index")
    graph.op("ScatterElements", [low, expanded, updated], output, axis=-1)
    return graph


FORMATS: dict[str, Callable[[str, str, str, CompressedTensors], Subgraph]] = {
    "dense": dense_format,
    "joined": joined_format,
    "structured": structured_format,
    "nm": nm_format,
}
