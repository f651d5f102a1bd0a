"""S stored dense, zeros included, plus the two thin MatMuls: the reference every other layout is checked against."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sslc_export.onnx.formats.base import Layout, Subgraph, checkpoint_integers, factors_t, has_low_rank

if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors


def add_low_rank(graph: Subgraph, x: str, layer: CompressedTensors, bits: int = 32) -> str:
    integers = checkpoint_integers(layer, bits)
    if integers is not None:  # already balanced by compress, on their grid
        hidden = graph.product(x, layer.v, integers.v, integers.grid, None, "V")
        return graph.product(hidden, layer.u, integers.u, integers.grid, None, "U")
    v_t, u_t = factors_t(layer)
    hidden = graph.matmul(x, v_t, None, "V")
    return graph.matmul(hidden, u_t, None, "U")


class DenseLayout(Layout):
    name = "dense"
    summary = "S stored dense (zeros included) + two thin MatMuls: the reference"
    writes_integers = True

    def build(self, graph: Subgraph, x: str, output: str, layer: CompressedTensors, bits: int) -> None:
        integers = checkpoint_integers(layer, bits)
        s_integers, grid = (integers.sparse, integers.grid) if integers else (None, None)
        if not has_low_rank(layer):
            graph.product(x, layer.sparse, s_integers, grid, output, "S")
            return
        sparse = graph.product(x, layer.sparse, s_integers, grid, None, "S")
        graph.op("Add", [sparse, add_low_rank(graph, x, layer, bits)], output, "sum")
