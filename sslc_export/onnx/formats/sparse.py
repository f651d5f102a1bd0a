"""S as per-row bitmask plus packed kept values, computed by our own onnxruntime operator
(runtimes/kernels): it reads only the kept values, so bytes and decode time fall with density.

The low-rank pair is fused into the same node (one read of x, one write of y, one node instead of three): the
operator computes y = [x, x·Vᵀ]·[S | U]ᵀ, with V and U stored in the same layout as fully kept rows
(sslc_export/sparse_rows.py), or kept on their supports where block-sparse (hss). With bits 8 or 4 the kept
values (and U, V) are quantized here, symmetric, with a scale per group of input columns taken from the kept
values only (searched, as compress --scales mse does), and the operator quantizes its activations to int8 per
group as well (activation_bits=8: integer dot products, as MatMulNBits' accuracy_level 4 does; the float path
costs several times more instructions than the bytes it saves). `reference` gives the exact dequantized factors:
with ACTIVATION_BITS = 32 the ONNX equals them at fp32 tolerance (a test checks it), with 8 it differs only by
the activations' rounding. A quantized checkpoint (compress --bits) already holds its integers and scales: they
are packed as they are (no second rounding), in the checkpoint's group size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sslc_export.onnx.formats.base import MATMULNBITS_RTOL, Layout, Subgraph, low_rank_to_write
from sslc_export.sparse_rows import DOMAIN, OP_TYPES, SparseRows, dequantize, pack, pack_quantized_rows

if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors

DOMAIN_VERSION = 1
GROUP_SIZE = 64  # input columns per scale: ~29 kept values at SSLC's usual 45 % density
ACTIVATION_BITS = 8  # of the quantized formats' inputs; 32 keeps them fp32 (exact against `reference`)
# Against the dequantized factors only the activations' int8 rounding differs, but over 30 layers it moved
# SmolLM2's logits by 7e-2 (int4) and 1.3e-1 (int8) of their range: the MatMulNBits int8 bound, a sanity check;
# quality is judged by perplexity. Exactness of the stored weights is tested with fp32 activations.
ACTIVATION_RTOL = MATMULNBITS_RTOL[8]
INPUT_NAMES = {32: ("mask", "values", "v_mask", "v_values"), 8: ("mask", "values", "scales", "v_mask", "v_values", "v_scales")}
INPUT_NAMES[4] = INPUT_NAMES[8]


def _packed(layer: CompressedTensors, bits: int) -> SparseRows:
    if layer.quantized is not None and bits != 32:
        return _packed_integers(layer)
    u, v = low_rank_to_write(layer, None)
    supports = None if layer.factor_masks is None else tuple(support.numpy() for support in layer.factor_masks)
    return pack(layer.sparse.numpy(), layer.mask.numpy(), u.numpy(), v.numpy(), bits, GROUP_SIZE,
                ACTIVATION_BITS if bits != 32 else 32, supports)


def _packed_integers(layer: CompressedTensors) -> SparseRows:
    """The checkpoint's own integers and scales: W' = [S | U] (its groups run over S's K columns, then U's R;
    exact because K is a multiple of the group size, see check_checkpoint_bits) and V, all rows fully kept."""
    import numpy as np

    factors = layer.quantized
    grid = factors.grid
    keep = np.concatenate([layer.mask.numpy(), np.ones(factors.u.q.shape, bool)], axis=1)
    q = np.concatenate([factors.sparse.q.numpy(), factors.u.q.numpy()], axis=1)
    scales = np.concatenate([factors.sparse.scales.numpy(), factors.u.scales.numpy()], axis=1)
    v = factors.v
    return SparseRows(pack_quantized_rows(keep, q, scales, grid.bits, grid.group_size),
                      pack_quantized_rows(np.ones(v.q.shape, bool), v.q.numpy(), v.scales.numpy(), grid.bits, grid.group_size),
                      grid.bits, grid.group_size, ACTIVATION_BITS)


class SparseLayout(Layout):
    name = "sparse"
    summary = "our operator on a bitmask-compressed S with U, V fused in (needs the kernel library)"
    quantizes_itself = True
    writes_integers = True
    custom_domain = DOMAIN

    def build(self, graph: Subgraph, x: str, output: str, layer: CompressedTensors, bits: int) -> None:
        packed = _packed(layer, bits)
        constants = [graph.constant(name, array) for name, array in zip(INPUT_NAMES[bits], packed.inputs(), strict=True)]
        graph.op(packed.op_type, [x, *constants], output, "sparse_matmul", domain=DOMAIN, **packed.attributes())
        graph.domains[DOMAIN] = DOMAIN_VERSION

    def reference(self, layer: CompressedTensors, bits: int) -> CompressedTensors:
        if bits == 32 or layer.quantized is not None:  # a quantized checkpoint's values are already the dequantized ones
            return layer
        import torch

        from sslc_export.checkpoint import CompressedTensors

        packed = _packed(layer, bits)
        joined = dequantize(packed.main, bits, GROUP_SIZE)
        k = packed.in_features
        return CompressedTensors(u=torch.from_numpy(joined[:, k:].copy()), v=torch.from_numpy(dequantize(packed.v, bits, GROUP_SIZE)),
                                 sparse=torch.from_numpy(joined[:, :k].copy()), mask=layer.mask, bias=layer.bias)

    def rtol(self, bits: int) -> float:
        return ACTIVATION_RTOL if bits != 32 and ACTIVATION_BITS != 32 else super().rtol(bits)

    def quantization(self, bits: int) -> dict | None:
        if bits == 32:
            return None
        return {"bits": bits, "kernel": f"{DOMAIN}.{OP_TYPES[bits]}", "group_size": GROUP_SIZE, "symmetric": True,
                "scales_from": "the kept values of each group of input columns", "scales": "mse",
                "activation_bits": ACTIVATION_BITS}
