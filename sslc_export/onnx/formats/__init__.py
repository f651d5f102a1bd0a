"""The format registry: a format is a layout × bits (32, 8, 4), named LAYOUT or LAYOUT-intB.

Everything that depends on the format string asks this module: which checkpoint patterns it
can express, how to build its nodes, whether MatMulNBits or the layout itself quantizes, the
validation tolerance and what export.json records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sslc_export.errors import UserError
from sslc_export.onnx.formats.base import Layout, Subgraph
from sslc_export.onnx.formats.dense import DenseLayout
from sslc_export.onnx.formats.joined import JoinedLayout
from sslc_export.onnx.formats.nm import NmLayout
from sslc_export.onnx.formats.sparse import SparseLayout
from sslc_export.onnx.formats.structured import StructuredLayout

if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (DenseLayout(), JoinedLayout(), StructuredLayout(), NmLayout(), SparseLayout())}
ALIASES = {"int8": "joined-int8", "int4": "joined-int4"}  # the names earlier releases used


@dataclass(frozen=True)
class Format:
    layout: Layout
    bits: int

    @property
    def name(self) -> str:
        return self.layout.name if self.bits == 32 else f"{self.layout.name}-int{self.bits}"

    @property
    def needs_kernels(self) -> bool:
        return self.layout.custom_domain is not None

    @property
    def rtol(self) -> float:
        return self.layout.rtol(self.bits)

    @property
    def matmulnbits_bits(self) -> int | None:
        """Bits for onnxruntime's MatMulNBits quantizer on the layout's MatMuls, if it is the one quantizing."""
        return None if self.bits == 32 or self.layout.quantizes_itself else self.bits

    def build(self, prefix: str, x: str, output: str, layer: CompressedTensors) -> Subgraph:
        graph = Subgraph(prefix)
        self.layout.build(graph, x, output, layer, self.bits)
        return graph

    def reference(self, layer: CompressedTensors) -> CompressedTensors:
        return self.layout.reference(layer, self.bits)

    def record(self) -> dict:
        return {"format": self.name, "layout": self.layout.name, "bits": self.bits,
                "quantization": self.layout.quantization(self.bits), "rtol": self.rtol}


FORMATS: dict[str, Format] = {
    Format(layout, bits).name: Format(layout, bits) for layout in LAYOUTS.values() for bits in layout.bits
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[ALIASES.get(name, name)]
    except KeyError:
        raise UserError(f"unknown format '{name}': choose one of {', '.join([*FORMATS, *ALIASES])}") from None


def check_pairing(fmt: Format, pattern_kind: str) -> None:
    if pattern_kind not in fmt.layout.patterns:
        needed = " or ".join(fmt.layout.patterns)
        raise UserError(f"format {fmt.name} needs a checkpoint compressed with --pattern {needed}; this one is {pattern_kind}")


def check_checkpoint_bits(fmt: Format, manifest: dict) -> None:
    """A quantized checkpoint exports its own integers (sparse-, dense- or joined-intB with its bits: our operator or
    MatMulNBits) or, in fp32 formats, the values they stand for; anything that would round them again is refused."""
    quantization = manifest.get("quantization")
    if quantization is None or fmt.bits == 32:
        return
    bits, group_size = quantization["bits"], quantization["group_size"]
    if not fmt.layout.writes_integers or fmt.bits != bits:
        writers = ", ".join(f"{layout.name}-int{bits}" for layout in LAYOUTS.values() if layout.writes_integers and bits in layout.bits)
        raise UserError(f"this checkpoint holds {bits}-bit integers from compress --bits {bits}; format {fmt.name} would round "
                        f"them again: export it as {writers} (its own integers) or an fp32 format (their values)")
    if not fmt.layout.quantizes_itself and group_size & (group_size - 1):
        raise UserError(f"format {fmt.name} writes MatMulNBits, whose blocks are powers of two; this checkpoint's groups are "
                        f"{group_size} columns: export it as sparse-int{bits}, or recompress with --group-size 16, 32, 64 or 128")
    for layer in manifest["layers"]:
        cols = layer["shape"][1]
        if layer["rank"] and cols % group_size:
            raise UserError(f"layer {layer['name']} has {cols} input columns, not a multiple of --group-size {group_size}, so "
                            f"[S | U] groups would straddle S and U: recompress with a --group-size that divides {cols}")


def help_text() -> str:
    """One line per layout for --help."""
    lines = [f"{layout.name}: {layout.summary}" + ("" if layout.bits == (32,) else " (also -int8, -int4)") for layout in LAYOUTS.values()]
    return "; ".join(lines) + "; int4/int8 = joined-int4/joined-int8."


__all__ = ["ALIASES", "FORMATS", "Format", "LAYOUTS", "Layout", "Subgraph", "check_checkpoint_bits", "check_pairing", "get_format",
           "help_text"]
