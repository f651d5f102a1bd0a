"""One MatMul for both branches: Concat[x, x·Vᵀ] @ [Sᵀ; Uᵀ]. Per Linear that is two MatMuls and a
Concat instead of three MatMuls and an Add: at batch-1 decode a node costs about as much as its bytes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from sslc_export.onnx.formats.base import Layout, Subgraph, checkpoint_integers, factors_t, has_low_rank
from sslc_export.quantization import Quantized

if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors


def add_joined(graph: Subgraph, x: str, x_sparse: str, s_t: np.ndarray, layer: CompressedTensors, output: str) -> None:
    """output = x_sparse·s_t + (x·Vᵀ)·Uᵀ in one MatMul on the concatenated inputs."""
    if not has_low_rank(layer):
        graph.matmul(x_sparse, s_t, output, "S")
        return
    v_t, u_t = factors_t(layer)
    projected = graph.matmul(x, v_t, None, "V")
    joined = graph.op("Concat", [x_sparse, projected], None, "joined", axis=-1)
    graph.matmul(joined, np.concatenate([s_t, u_t], axis=0), output, "SU")


class JoinedLayout(Layout):
    name = "joined"
    summary = "S dense, sharing one MatMul with Uᵀ: Concat[x, x·Vᵀ] @ [Sᵀ; Uᵀ]"
    writes_integers = True

    def build(self, graph: Subgraph, x: str, output: str, layer: CompressedTensors, bits: int) -> None:
        integers = checkpoint_integers(layer, bits)
        if integers is None:
            add_joined(graph, x, x, layer.sparse.T.numpy(), layer, output)
            return
        # [S | U] as one grid matrix: whole groups on each side (export checks that the group size divides n).
        grid = integers.grid
        if not has_low_rank(layer):
            graph.product(x, layer.sparse, integers.sparse, grid, output, "S")
            return
        projected = graph.product(x, layer.v, integers.v, grid, None, "V")
        joined = graph.op("Concat", [x, projected], None, "joined", axis=-1)
        both = Quantized(torch.cat([integers.sparse.q, integers.u.q], dim=1), torch.cat([integers.sparse.scales, integers.u.scales], dim=1))
        graph.product(joined, torch.cat([layer.sparse, layer.u], dim=1), both, grid, output, "SU")
