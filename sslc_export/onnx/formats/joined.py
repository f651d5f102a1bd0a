"""One MatMul for both branches: Concat[x, x·Vᵀ] @ [Sᵀ; Uᵀ]. Per Linear that is two MatMuls and a
Concat instead of three MatMuls and an Add: at batch-1 decode a node costs about as much as its bytes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sslc_export.onnx.formats.base import Layout, Subgraph, factors_t, has_low_rank

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

    def build(self, graph: Subgraph, x: str, output: str, layer: CompressedTensors, bits: int) -> None:
        add_joined(graph, x, x, layer.sparse.T.numpy(), layer, output)
