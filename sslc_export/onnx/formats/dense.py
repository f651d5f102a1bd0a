"""S stored dense, zeros included, plus the two thin MatMuls: the reference every other layout is checked against."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sslc_export.onnx.formats.base import Layout, Subgraph, checkpoint_integers, has_low_rank, low_rank_to_write

if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors


def add_low_rank(graph: Subgraph, x: str, layer: CompressedTensors, bits: int = 32) -> str:
    integers = checkpoint_integers(layer, bits)
    u, v = low_rank_to_write(layer, integers)
    grid = integers.grid if integers else None
    hidden = graph.product(x, v, integers.v if integers else None, grid, None, "V")
    return graph.product(hidden, u, integers.u if integers else None, grid, None, "U")


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
