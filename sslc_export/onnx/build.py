"""The export stage end to end: checkpoint (or dense model) -> ONNX folder, written atomically.

The folder holds model.onnx (plus model.onnx.data past 2 GB), config and tokenizer files,
and export.json (format, source, sizes and hashes; written last).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import onnx

from sslc_export.models.loading import LoadedModel, load_model
from sslc_export.runtimes import kernels
from sslc_export.runtimes.session import EXPORT_MANIFEST
from sslc_export import __version__
from sslc_export.atomic import check_writable_target, file_inventory, partial_path, publish_directory, write_json_atomic
from sslc_export.checkpoint import CompressedTensors, checkpoint_grid, load_checkpoint, read_block, read_manifest
from sslc_export.onnx.export import ONNX_FILE, dense_equivalent, export_dense
from sslc_export.errors import UserError
from sslc_export.onnx.genai import GENAI_CONFIG, genai_config
from sslc_export.onnx.onnx_io import save_onnx
from sslc_export.onnx.formats import Format, check_checkpoint_bits, check_pairing, get_format
from sslc_export.onnx.formats.base import MATMULNBITS_RTOL
from sslc_export.onnx.fuse import fuse, fused_op_counts
from sslc_export.onnx.quantize import check_lm_head, decoder_matmuls, quantize_head, quantize_nodes
from sslc_export.onnx.rewrite import rewrite



GRAPHS = ("fused", "optimum")


def check_graph(graph: str) -> None:
    if graph not in GRAPHS:
        raise UserError(f"--graph must be one of {', '.join(GRAPHS)}, not {graph}")


def _build(loaded: LoadedModel, out: Path, transform: Callable[[onnx.ModelProto], onnx.ModelProto], record: dict,
           fused: bool = True) -> dict:
    """Dense export into `.OUT.partial`, transform, fuse, save, then publish with export.json last.
    On any failure the partial folder is removed: nothing half-written is left behind.

    Fusing comes last, so it sees the rewritten and quantized nodes and leaves them as they are: optimum's
    graph has thousands of small nodes and about half of a decode step was their overhead."""
    loaded.architecture.check_exportable(loaded.model.config)
    started = time.perf_counter()
    work = partial_path(out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        export_dense(loaded.model, loaded.tokenizer, work)
        loaded.tokenizer.save_pretrained(work)  # optimum skips it for some sources (a GGUF-loaded model); runtimes need it
        model = onnx.load(str(work / ONNX_FILE))  # pulls in optimum's external data, if it wrote any
        for stale in work.glob(f"{ONNX_FILE}?*"):
            stale.unlink()
        model = transform(model)
        config = loaded.model.config
        if fused:
            model = fuse(model, config, attention=loaded.architecture.fuses_attention(config))
        counts = fused_op_counts(model)
        save_onnx(model, work / ONNX_FILE)
        library = str(kernels.require()) if record.get("custom_ops") else None
        share_buffer = counts["GroupQueryAttention"] == config.num_hidden_layers  # GQA updates the KV cache in place
        write_json_atomic(work / GENAI_CONFIG, genai_config(config, loaded.architecture, loaded.tokenizer, ONNX_FILE, library, share_buffer))
        record = {
            "tool": {"name": "sslc-export", "version": __version__},
            **record,
            "graph": {"kind": "fused" if fused else "optimum", **counts},
            "export_seconds": round(time.perf_counter() - started, 1),
            "files": file_inventory(work),
        }
        record["onnx_bytes"] = sum(f["bytes"] for name, f in record["files"].items() if name.startswith(ONNX_FILE))
        write_json_atomic(work / EXPORT_MANIFEST, record)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish_directory(work, out)
    return record


def _format_record(fmt: Format, lm_head: str) -> dict:
    """The format's own record; a quantized lm_head loosens the tolerance to MatMulNBits' sanity bound."""
    record = {**fmt.record(), "lm_head": lm_head, "custom_ops": fmt.layout.custom_domain}
    if lm_head != "fp32":
        record["rtol"] = max(record["rtol"], MATMULNBITS_RTOL[int(lm_head.removeprefix("int"))])
    return record


def export_checkpoint_dir(checkpoint: Path, out: Path, fmt: str = "dense", overwrite: bool = False, lm_head: str = "fp32",
                          graph: str = "fused") -> dict:
    chosen = get_format(fmt)
    check_graph(graph)
    manifest = read_manifest(checkpoint)
    check_pairing(chosen, manifest["pattern"]["kind"])
    check_checkpoint_bits(chosen, manifest)
    check_lm_head(lm_head)
    if chosen.needs_kernels:
        kernels.require()
    check_writable_target(out, overwrite)
    loaded, manifest = load_checkpoint(checkpoint)
    layers: dict[str, CompressedTensors] = {}
    for index in range(manifest["num_blocks"]):
        layers.update(read_block(checkpoint, index, checkpoint_grid(manifest)))
    dense_equivalent(loaded.model)

    def transform(model: onnx.ModelProto) -> onnx.ModelProto:
        rewritten = rewrite(model, layers, chosen, loaded.architecture)
        model = rewritten.model
        if chosen.matmulnbits_bits is not None:  # exactly the format's own MatMuls (U, V and the kept part of S)
            model = quantize_nodes(model, chosen.matmulnbits_bits, rewritten.matmuls)
        return quantize_head(model, lm_head)  # the same lm_head/embedding choice for every format

    record = {
        **_format_record(chosen, lm_head),
        "source": {"checkpoint": str(checkpoint), "method": manifest["method"], "ratio": manifest["ratio"],
                   "pattern": manifest["pattern"], "checkpoint_dense_sha256": manifest["files"]["dense.safetensors"]["sha256"]},
        "compressed_layers": len(layers),
    }
    grid = checkpoint_grid(manifest)
    if grid is not None and record["quantization"] is not None:  # the checkpoint's integers, written as they are
        record["quantization"] = {**record["quantization"], **grid.record(), "integers_from": "the checkpoint (compress --bits)"}
        if "block_size" in record["quantization"]:  # MatMulNBits in the checkpoint's groups; only its int8 activations round
            record["quantization"]["block_size"] = grid.group_size
            head = [] if lm_head == "fp32" else [MATMULNBITS_RTOL[int(lm_head.removeprefix("int"))]]
            record["rtol"] = max([MATMULNBITS_RTOL[8], *head])
    return _build(loaded, out, transform, record, fused=graph == "fused" and chosen.layout.fusable)


BASELINE_BITS = {"dense": 32, "int8": 8, "int4": 4}


def export_dense_model(source: str | None, out: Path, fmt: str = "dense", overwrite: bool = False, lm_head: str = "fp32",
                       graph: str = "fused") -> dict:
    """The uncompressed baseline; int4/int8 quantize every decoder-block MatMul as onnxruntime's tool does."""
    if fmt not in BASELINE_BITS:
        raise UserError(f"a dense baseline can be exported as {', '.join(BASELINE_BITS)}, not {fmt}")
    check_lm_head(lm_head)
    check_graph(graph)
    check_writable_target(out, overwrite)
    loaded = load_model(source)
    bits = BASELINE_BITS[fmt]
    baseline = get_format("dense" if bits == 32 else f"joined-int{bits}")  # MatMulNBits on the dense weights

    def transform(model: onnx.ModelProto) -> onnx.ModelProto:
        if bits != 32:
            model = quantize_nodes(model, bits, decoder_matmuls(model, loaded.architecture.onnx_block_scope))
        return quantize_head(model, lm_head)  # the same lm_head/embedding choice for every format

    record = {
        **_format_record(baseline, lm_head),
        "format": f"{fmt}-baseline",
        "layout": "dense",
        "source": loaded.identity,
        "compressed_layers": 0,
    }
    return _build(loaded, out, transform, record, fused=graph == "fused")
