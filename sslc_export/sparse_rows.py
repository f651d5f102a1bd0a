"""The "sparse rows" layout read by the native operators of domain ``ai.sslc`` (runtimes/kernels).

One Linear ``y = x·Sᵀ + (x·Vᵀ)·Uᵀ`` becomes one node: ``t = x·Vᵀ`` then ``y = [x, t]·W'ᵀ`` with
``W' = [S | U]`` (N × (K+R)). W' and V are stored the same way, as *parts*:

- ``mask``: uint8 ``[rows, ceil(cols/8)]``; bit j (LSB first) of byte b of row n says whether
  column 8b+j is kept. Bits at columns >= cols are 0. U and V are fully kept.
- ``values``: the kept values, row-major in kept-column order.
  bits=32: float32 ``[nnz]``. bits=8: int8 ``[nnz]``, value = q·scale, q in [-127, 127].
  bits=4: uint8 bytes, two nibbles per byte, low nibble first, nibble = q+8 with q in [-8, 7];
  the values run on across groups but every *run* of ``nibble_run(group_size)`` groups (as many as
  fill 64 columns: 4 of 16, 2 of 32; one group when groups are wider) starts on a byte boundary (a
  run with an odd count of kept values ends with a padding nibble 0), so row and run offsets follow
  from popcounts and a 64-column step of the kernels places its values from one run.
- ``scales`` (bits 8 and 4): float32 ``[rows, ceil(cols/group_size)]``, symmetric, from the kept
  values of each group only (``pack``: the shrink of max|kept| / 127 or / 7 that rounds the group with the
  least squared error; round to nearest).

Operator inputs after x: fp32 ``mask, values, v_mask, v_values``; quantized
``mask, values, scales, v_mask, v_values, v_scales`` (see ``SparseRows.inputs``).

Attribute ``activation_bits`` (bits 8 and 4 only; absent means 32): with 32 the inputs stay fp32
and meet the dequantized weights. With 8, every product quantizes its input rows first, for any
number of rows: ``t = x·Vᵀ`` from x in groups of V's columns, then ``y`` from ``[x, t]`` (t in
fp32) in groups of W''s columns, the same column groups as the weight scales. Per row and group:
``x_scale = max|x| / 127`` (fp32), ``q = rint(x / x_scale)`` (fp32 division, half to even) clamped
to [-127, 127], all 0 when x_scale is 0; then
``y[m,n] = Σ_g w_scale[n,g]·x_scale[m,g]·Σ_{c in g} W_int[n,c]·q[m,c]`` with W_int the stored
integers (``activation_quantize`` and ``reference``). The kernels compute the integer sums
exactly (decode) or multiply the dequantized factors in fp32 (prefill): fp32 rounding apart,
the same value; a t that differs by fp32 rounding may move its q by one step.

Attribute ``activation`` (absent, or ``"swiglu"``): with ``"swiglu"`` the rows of W' are
(gate, up) pairs, interleaved, and the node outputs ``silu(y[..., 0::2]) · y[..., 1::2]``: a gated
MLP's gate_proj, up_proj and activation in one node. ``merge`` builds such nodes (and q/k/v ones)
from the per-Linear packings, exactly: every kept value, integer and scale is carried over.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAIN = "ai.sslc"
OP_TYPES = {32: "SparseMatMul", 8: "SparseMatMulInt8", 4: "SparseMatMulInt4"}
QMAX = {8: 127, 4: 7}
ACTIVATION_BITS = (32, 8)


@dataclass(frozen=True)
class RowsPart:
    """One matrix (W' or V) in the sparse-rows layout; ``cols`` is its logical width."""

    mask: np.ndarray
    values: np.ndarray
    scales: np.ndarray | None
    cols: int

    def arrays(self) -> list[np.ndarray]:
        return [self.mask, self.values] + ([] if self.scales is None else [self.scales])


@dataclass(frozen=True)
class SparseRows:
    """A packed ``W' = [S | U]`` and ``V``: everything one ai.sslc node needs besides x."""

    main: RowsPart
    v: RowsPart
    bits: int
    group_size: int
    activation_bits: int = 32
    activation: str | None = None  # "swiglu": interleaved (gate, up) rows, N/2 outputs

    @property
    def in_features(self) -> int:
        return self.v.cols

    @property
    def out_features(self) -> int:
        """Outputs per input row: W''s rows, or half of them after a swiglu."""
        rows = self.main.mask.shape[0]
        return rows // 2 if self.activation == "swiglu" else rows

    @property
    def rank(self) -> int:
        return self.v.mask.shape[0]

    @property
    def op_type(self) -> str:
        return OP_TYPES[self.bits]

    def inputs(self) -> list[np.ndarray]:
        """The constant inputs 1.. of the operator, in its input order."""
        return self.main.arrays() + self.v.arrays()

    def attributes(self) -> dict[str, int | str]:
        attrs: dict[str, int | str] = {"in_features": self.in_features}
        if self.bits != 32:
            attrs["group_size"] = self.group_size
        if self.activation_bits != 32:
            attrs["activation_bits"] = self.activation_bits
        if self.activation is not None:
            attrs["activation"] = self.activation
        return attrs

    @classmethod
    def from_node(cls, op_type: str, arrays: list[np.ndarray], attributes: dict) -> SparseRows:
        """The packing an ai.sslc node carries (its constant inputs after x, its attributes)."""
        bits = {name: b for b, name in OP_TYPES.items()}.get(op_type)
        if bits is None:
            raise ValueError(f"{op_type} is not an operator of domain {DOMAIN}")
        per_part = 2 if bits == 32 else 3
        if len(arrays) != 2 * per_part:
            raise ValueError(f"{op_type} takes {2 * per_part} constant inputs, got {len(arrays)}")
        k = int(attributes["in_features"])
        main, v = arrays[:per_part], arrays[per_part:]
        rank = v[0].shape[0]
        scales = (lambda part: None) if bits == 32 else (lambda part: part[2])
        activation = attributes.get("activation")
        return cls(RowsPart(main[0], main[1], scales(main), k + rank), RowsPart(v[0], v[1], scales(v), k), bits,
                   int(attributes.get("group_size", 64)), int(attributes.get("activation_bits", 32)),
                   activation.decode() if isinstance(activation, bytes) else activation)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.inputs())


def pack(sparse: np.ndarray, mask: np.ndarray, u: np.ndarray, v: np.ndarray, bits: int = 32,
         group_size: int = 64, activation_bits: int = 32,
         factor_masks: tuple[np.ndarray, np.ndarray] | None = None) -> SparseRows:
    """Pack S (N×K, with its keep ``mask``), U (N×R) and V (R×K) for one ai.sslc node.

    Entries of ``sparse`` outside ``mask`` are ignored; R may be 0 (u: N×0, v: 0×K). U and V are kept whole, or
    only on ``factor_masks`` (their supports, when block-sparse: hss).
    ``activation_bits=8`` (bits 8 or 4 only) makes the node quantize its inputs (module docstring)."""
    n, k = sparse.shape
    u_keep, v_keep = (np.ones(u.shape, bool), np.ones(v.shape, bool)) if factor_masks is None else factor_masks
    if (mask.shape != (n, k) or u.shape[0] != n or v.shape[1] != k or u.shape[1] != v.shape[0] or u_keep.shape != u.shape
            or v_keep.shape != v.shape):
        raise ValueError(f"shapes disagree: S {sparse.shape}, mask {mask.shape}, U {u.shape}, V {v.shape}, "
                         f"supports {u_keep.shape}, {v_keep.shape}")
    if bits not in OP_TYPES or group_size <= 0 or group_size % 16:
        raise ValueError(f"bits must be 32, 8 or 4 and group_size a positive multiple of 16, got {bits}, {group_size}")
    if activation_bits not in ACTIVATION_BITS or (activation_bits != 32 and bits == 32):
        raise ValueError(f"activation_bits must be 32, or 8 with 8- or 4-bit weights, got {activation_bits} ({bits}-bit)")
    joined = np.concatenate([sparse, u], axis=1).astype(np.float32)
    keep = np.concatenate([mask.astype(bool), u_keep.astype(bool)], axis=1)
    return SparseRows(pack_rows(joined, keep, bits, group_size),
                      pack_rows(v.astype(np.float32), v_keep.astype(bool), bits, group_size), bits, group_size,
                      activation_bits)


def pack_rows(dense: np.ndarray, keep: np.ndarray, bits: int, group_size: int) -> RowsPart:
    """One matrix to a RowsPart: bit mask, kept values (quantized per group of columns for 8/4 bits)."""
    rows, cols = dense.shape
    packed_mask = np.packbits(keep, axis=1, bitorder="little").reshape(rows, (cols + 7) // 8)
    if bits == 32:
        return RowsPart(packed_mask, dense[keep].astype(np.float32), None, cols)
    grouped = _grouped(np.where(keep, dense, 0), group_size)
    scales = _searched_scales(grouped, bits)
    safe = np.where(scales > 0, scales, 1.0)[:, :, None]
    q = np.clip(np.rint(grouped / safe), -QMAX[bits] - (bits == 4), QMAX[bits]).astype(np.int8)
    return pack_quantized_rows(keep, q.reshape(rows, q.shape[1] * group_size)[:, :cols], scales, bits, group_size)


def _searched_scales(grouped: np.ndarray, bits: int) -> np.ndarray:
    """Each group's scale as compress --scales mse chooses it (from the kept values: the others are 0 here, and 0
    rounds to 0 at any scale), so a post-hoc quantized export rounds as well as it can without error feedback."""
    import torch

    from sslc_export.quantization import Grid  # it imports QMAX from here

    rows, groups, size = grouped.shape
    flat = torch.from_numpy(np.ascontiguousarray(grouped, dtype=np.float32).reshape(rows * groups, size))
    return Grid(bits, size, "mse").scales(flat).numpy().reshape(rows, groups)


def pack_quantized_rows(keep: np.ndarray, q: np.ndarray, scales: np.ndarray, bits: int, group_size: int) -> RowsPart:
    """Integers already chosen (``q`` [rows, cols], entries outside ``keep`` ignored; ``scales``
    [rows, ceil(cols/group_size)]) to a RowsPart, exactly: no second rounding."""
    rows, cols = keep.shape
    lowest = -QMAX[bits] - (bits == 4)
    if q.shape != (rows, cols) or scales.shape != (rows, -(-cols // group_size)):
        raise ValueError(f"q {q.shape} and scales {scales.shape} do not fit a {rows}x{cols} mask in groups of {group_size}")
    if keep.any() and (q[keep].min() < lowest or q[keep].max() > QMAX[bits]):
        raise ValueError(f"{bits}-bit integers must lie in [{lowest}, {QMAX[bits]}]")
    packed_mask = np.packbits(keep, axis=1, bitorder="little").reshape(rows, (cols + 7) // 8)
    grouped_keep, grouped_q = _grouped(keep, group_size), _grouped(q.astype(np.int8), group_size)
    scales = scales.astype(np.float32)
    if bits == 8:
        return RowsPart(packed_mask, grouped_q[grouped_keep], scales, cols)
    return RowsPart(packed_mask, _pack_nibbles(grouped_q, grouped_keep), scales, cols)


def merge(parts: list[SparseRows], interleave: bool = False) -> SparseRows:
    """One node for several products of the same input: W' rows stacked (or, with ``interleave``,
    two parts' rows alternated, for a swiglu), V rows stacked, and each part's U columns moved to
    its own rank range, so that row i of part p still meets only t_p. Quantized parts keep their
    integers and scales: each rank range starts on a group boundary (its padding columns and V
    rows are empty), so every group holds the same kept values as before and the node computes
    what the separate nodes did, activation quantization included (fp32 parts need no padding). Raises ValueError when the
    parts differ in kind or K is not a whole number of groups."""
    first = parts[0]
    kinds = {(p.bits, p.group_size, p.activation_bits, p.in_features, p.activation) for p in parts}
    k, bits, g = first.in_features, first.bits, first.group_size
    if len(kinds) != 1 or first.activation is not None:
        raise ValueError("only plain ai.sslc nodes of one kind (bits, group size, input width) merge")
    if interleave and (len(parts) != 2 or parts[0].out_features != parts[1].out_features):
        raise ValueError("interleaving takes two parts with as many rows each")
    align = 1 if bits == 32 else g
    if k % align:
        raise ValueError(f"in_features {k} is not a multiple of the group size {g}")
    starts = np.cumsum([0] + [-(-p.rank // align) * align for p in parts])
    rank, rows = int(starts[-2]) + parts[-1].rank, sum(p.out_features for p in parts)  # the last needs no padding
    w_keep, w_values = np.zeros((rows, k + rank), bool), np.zeros((rows, k + rank), np.float32)
    v_keep, v_values = np.zeros((rank, k), bool), np.zeros((rank, k), np.float32)
    w_scales = np.zeros((rows, -(-(k + rank) // g)), np.float32)
    v_scales = np.zeros((rank, -(-k // g)), np.float32)
    row = 0
    for part, start in zip(parts, starts[:-1]):
        n, r = part.out_features, part.rank
        keep, values = _unpacked(part.main, bits, g)
        columns = np.r_[0:k, k + start:k + start + r]
        w_keep[row:row + n, columns], w_values[row:row + n, columns] = keep, values
        keep, values = _unpacked(part.v, bits, g)
        v_keep[start:start + r], v_values[start:start + r] = keep, values
        if bits != 32:
            w_scales[row:row + n, : k // g] = part.main.scales[:, : k // g]
            w_scales[row:row + n, (k + start) // g:(k + start) // g + part.main.scales.shape[1] - k // g] = part.main.scales[:, k // g:]
            v_scales[start:start + r] = part.v.scales
        row += n
    if interleave:
        order = np.arange(rows).reshape(2, -1).T.ravel()  # gate 0, up 0, gate 1, up 1, ...
        w_keep, w_values, w_scales = w_keep[order], w_values[order], w_scales[order]
    if bits == 32:
        main, v = pack_rows(w_values, w_keep, 32, g), pack_rows(v_values, v_keep, 32, g)
    else:
        main = pack_quantized_rows(w_keep, w_values, w_scales, bits, g)
        v = pack_quantized_rows(v_keep, v_values, v_scales, bits, g)
    return SparseRows(main, v, bits, g, first.activation_bits, "swiglu" if interleave else None)


def _unpacked(part: RowsPart, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, kept values: floats for fp32, the stored integers otherwise)."""
    keep = np.unpackbits(part.mask, axis=1, count=part.cols, bitorder="little").astype(bool)
    return keep, dequantize(part, bits, group_size, scaled=False)


def swiglu(y: np.ndarray) -> np.ndarray:
    """silu(gate)·up over interleaved (gate, up) columns."""
    gate, up = y[..., 0::2], y[..., 1::2]
    return gate / (1 + np.exp(-gate)) * up


def _grouped(a: np.ndarray, group_size: int) -> np.ndarray:
    """[rows, cols] -> [rows, groups, group_size], zero/False padded."""
    rows, cols = a.shape
    groups = -(-cols // group_size)
    out = np.zeros((rows, groups * group_size), a.dtype)
    out[:, :cols] = a
    return out.reshape(rows, groups, group_size)


def nibble_run(group_size: int) -> int:
    """Groups per byte-aligned run of int4 values: as many as fill 64 columns, at least one."""
    return -(-64 // group_size)


def _group_nibble_starts(grouped_keep: np.ndarray) -> tuple[np.ndarray, int]:
    """Nibble offset of every (row, group) and the total: groups follow each other within a run of
    nibble_run groups, each run padded to an even count."""
    counts = grouped_keep.sum(axis=2)
    rows, groups = counts.shape
    per_run = nibble_run(grouped_keep.shape[2])
    runs = -(-groups // per_run)
    by_run = np.zeros((rows, runs * per_run), counts.dtype)
    by_run[:, :groups] = counts
    by_run = by_run.reshape(rows, runs, per_run)
    run_counts = by_run.sum(axis=2)
    padded = (run_counts + (run_counts & 1)).ravel()
    run_starts = (np.cumsum(padded) - padded).reshape(rows, runs)
    within = np.cumsum(by_run, axis=2) - by_run
    return (run_starts[:, :, None] + within).reshape(rows, runs * per_run)[:, :groups], int(padded.sum())


def _pack_nibbles(q: np.ndarray, grouped_keep: np.ndarray) -> np.ndarray:
    starts, total = _group_nibble_starts(grouped_keep)
    rank = np.cumsum(grouped_keep, axis=2) - 1
    nibbles = np.zeros(total, np.uint8)
    nibbles[(starts[:, :, None] + rank)[grouped_keep]] = (q[grouped_keep] + 8).astype(np.uint8)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def dequantize(part: RowsPart, bits: int, group_size: int, scaled: bool = True) -> np.ndarray:
    """The dense float32 matrix a RowsPart stands for (zeros where not kept); the stored integers
    themselves when not ``scaled`` (bits 8 and 4)."""
    rows = part.mask.shape[0]
    keep = np.unpackbits(part.mask, axis=1, count=part.cols, bitorder="little").astype(bool)
    out = np.zeros((rows, part.cols), np.float32)
    if bits == 32:
        out[keep] = part.values
        return out
    grouped_keep = _grouped(keep, group_size)
    if bits == 8:
        q = part.values.astype(np.float32)
    else:
        starts, _ = _group_nibble_starts(grouped_keep)
        nibbles = np.stack([part.values & 15, part.values >> 4], axis=1).ravel()
        positions = (starts[:, :, None] + np.cumsum(grouped_keep, axis=2) - 1)[grouped_keep]
        q = nibbles[positions].astype(np.float32) - 8
    scale = np.broadcast_to(part.scales[:, :, None], grouped_keep.shape)[grouped_keep]
    out[keep] = q * scale if scaled else q
    return out


def activation_quantize(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """activation_bits=8 for rows x [M, cols]: integers q [M, groups, group_size] (zero-padded) and
    x_scale [M, groups], both float32, exactly as the kernels compute them."""
    grouped = _grouped(x.astype(np.float32), group_size)
    scale = np.abs(grouped).max(axis=2, initial=0.0) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))[:, :, None]
    return np.clip(np.rint(grouped / safe), -127, 127).astype(np.float32), scale.astype(np.float32)


def quantized_product(x: np.ndarray, part: RowsPart, bits: int, group_size: int) -> np.ndarray:
    """activation_bits=8: Σ_g w_scale·x_scale·(W_int·q) in float64 for rows x [M, part.cols]."""
    q, x_scale = activation_quantize(x, group_size)
    w_int = _grouped(dequantize(part, bits, group_size, scaled=False), group_size).astype(np.float64)
    dots = q.astype(np.float64).transpose(1, 0, 2) @ w_int.transpose(1, 2, 0)  # [groups, M, N], exact
    scales = x_scale.T.astype(np.float64)[:, :, None] * part.scales.T.astype(np.float64)[:, None, :]
    return (dots * scales).sum(axis=0)


def reference(x: np.ndarray, packed: SparseRows) -> np.ndarray:
    """What the operator computes, in float64: ``[x, x·Vᵀ]·W'ᵀ`` from the dequantized parts, or
    with activation_bits=8 the integer arithmetic of the module docstring (t rounded to fp32);
    then the swiglu, if the node has one."""
    y = _product(x, packed)
    return swiglu(y) if packed.activation == "swiglu" else y


def _product(x: np.ndarray, packed: SparseRows) -> np.ndarray:
    if packed.activation_bits == 8:
        rows = x.reshape(-1, packed.in_features).astype(np.float32)
        t = quantized_product(rows, packed.v, packed.bits, packed.group_size).astype(np.float32)
        y = quantized_product(np.concatenate([rows, t], axis=1), packed.main, packed.bits, packed.group_size)
        return y.reshape(*x.shape[:-1], packed.main.mask.shape[0])
    w = dequantize(packed.main, packed.bits, packed.group_size).astype(np.float64)
    v = dequantize(packed.v, packed.bits, packed.group_size).astype(np.float64)
    x64 = x.astype(np.float64)
    return np.concatenate([x64, x64 @ v.T], axis=-1) @ w.T
