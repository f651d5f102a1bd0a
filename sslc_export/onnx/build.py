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

from models.loading import LoadedModel, load_model
from sslc_export import __version__
from sslc_export.atomic import check_writable_target, file_inventory, partial_path, publish_directory, write_json_atomic
from sslc_export.checkpoint import CompressedTensors, load_checkpoint, read_block, read_manifest
from sslc_export.onnx.export import ONNX_FILE, dense_equivalent, export_dense
from sslc_export.errors import UserError
from sslc_export.onnx.genai import GENAI_CONFIG, genai_config
from sslc_export.onnx.onnx_io import PROTOBUF_LIMIT, save_onnx  # noqa: F401 (PROTOBUF_LIMIT: old import path)
from sslc_export.onnx.quantize import ACCURACY_LEVEL, BLOCK_SIZE, QUANTIZED_FORMATS, quantize_matmuls
from sslc_export.onnx.rewrite import check_pairing, rewrite

EXPORT_MANIFEST = "export.json"


def _quantization(bits: int | None) -> dict | None:
    return None if bits is None else {"bits": bits, "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL, "symmetric": True}


def _build(loaded: LoadedModel, out: Path, transform: Callable[[onnx.ModelProto], onnx.ModelProto], record: dict) -> dict:
    """Dense export into `.OUT.partial`, transform, save, then publish with export.json last.
    On any failure the partial folder is removed: nothing half-written is left behind."""
    started = time.perf_counter()
    work = partial_path(out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        export_dense(loaded.model, loaded.tokenizer, work)
        loaded.tokenizer.save_pretrained(work)  # optimum skips it for some sources (a GGUF-loaded model); runtimes need it
        write_json_atomic(work / GENAI_CONFIG, genai_config(loaded.model.config, loaded.tokenizer, ONNX_FILE))
        model = onnx.load(str(work / ONNX_FILE))  # pulls in optimum's external data, if it wrote any
        for stale in work.glob(f"{ONNX_FILE}?*"):
            stale.unlink()
        save_onnx(transform(model), work / ONNX_FILE)
        record = {
            "tool": {"name": "sslc-export", "version": __version__},
            **record,
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


def export_checkpoint_dir(checkpoint: Path, out: Path, fmt: str = "dense", overwrite: bool = False) -> dict:
    manifest = read_manifest(checkpoint)
    check_pairing(fmt, manifest["pattern"]["kind"])
    check_writable_target(out, overwrite)
    loaded, manifest = load_checkpoint(checkpoint)
    layers: dict[str, CompressedTensors] = {}
    for index in range(manifest["num_blocks"]):
        layers.update(read_block(checkpoint, index))
    dense_equivalent(loaded.model)
    bits = QUANTIZED_FORMATS.get(fmt)
    layout = fmt if bits is None else ("structured" if manifest["pattern"]["kind"] == "structured" else "joined")

    def transform(model: onnx.ModelProto) -> onnx.ModelProto:
        model = rewrite(model, layers, layout)
        if bits is not None:  # U, V and the kept part of S; embeddings and lm_head stay fp32
            ours = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name.split("/")[0] in layers]
            model = quantize_matmuls(model, bits, ours)
        return model

    record = {
        "format": fmt,
        "layout": layout,
        "quantization": _quantization(bits),
        "source": {"checkpoint": str(checkpoint), "method": manifest["method"], "ratio": manifest["ratio"],
                   "pattern": manifest["pattern"], "checkpoint_dense_sha256": manifest["files"]["dense.safetensors"]["sha256"]},
        "compressed_layers": len(layers),
    }
    return _build(loaded, out, transform, record)


def export_dense_model(source: str | None, out: Path, fmt: str = "dense", overwrite: bool = False) -> dict:
    """The uncompressed baseline; int4/int8 quantize every MatMul as onnxruntime's tool does by default."""
    if fmt not in ("dense", *QUANTIZED_FORMATS):
        raise UserError(f"a dense baseline can be exported as dense, {' or '.join(QUANTIZED_FORMATS)}, not {fmt}")
    check_writable_target(out, overwrite)
    loaded = load_model(source)
    bits = QUANTIZED_FORMATS.get(fmt)
    record = {
        "format": "dense-baseline" if bits is None else f"{fmt}-baseline",
        "quantization": _quantization(bits),
        "source": loaded.identity,
        "compressed_layers": 0,
    }
    return _build(loaded, out, (lambda model: model) if bits is None else (lambda model: quantize_matmuls(model, bits)), record)
