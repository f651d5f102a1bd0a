"""The compressed checkpoint: a self-contained folder any later stage can load.

    manifest.json        written last; method, settings, per-layer figures, file hashes
    config.json, tokenizer files
    dense.safetensors    everything that is not a compressed Linear (embeddings, norms, lm_head)
    blocks/block-NNNN.safetensors
        <linear>.u (m x r)  <linear>.v (r x n)  <linear>.bias (if any)
        <linear>.s_mask     S's support as packed bits, row-major (m*n/8 bytes)
        <linear>.s_values   S's kept values in the same order (never a zero-filled matrix)
    block-sparse U and V (hss), instead of u and v: their supports and kept values as S's, and their shape
        <linear>.u_mask <linear>.u_values <linear>.v_mask <linear>.v_values <linear>.factor_shape (m, r, n)
    quantized (compress --bits; format_version 2, manifest "quantization": bits, group_size), instead of
    u, v and s_values: the integers (int8, whatever the bits) and fp32 scales per (row, group of input columns)
        <linear>.u_q <linear>.u_scales  <linear>.v_q <linear>.v_scales
        <linear>.s_q (S's kept integers in mask order)  <linear>.s_scales

While compression runs the folder is `.NAME.partial`, holding progress for --resume.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sslc_export.models.architectures import architecture_for
from sslc_export.models.loading import LoadedModel, fix_end_token, load_model
from sslc_export.atomic import file_inventory, partial_path, publish_directory, verify_inventory, write_file_atomic, write_json_atomic
from sslc_export.errors import UserError
from sslc_export.layers import SparseLowRankLinear, replace_linear
from sslc_export.quantization import Grid, Quantized, QuantizedFactors

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
HIDDEN = "progress-hidden.safetensors"
FORMAT_VERSION = 1
QUANTIZED_FORMAT_VERSION = 2  # integers and scales: an older tool must refuse, not misread
READABLE_VERSIONS = (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION)


@dataclass
class CompressedTensors:
    """What a compressed Linear is made of, independent of torch modules."""

    u: torch.Tensor
    v: torch.Tensor
    sparse: torch.Tensor
    mask: torch.Tensor
    bias: torch.Tensor | None = None
    quantized: QuantizedFactors | None = None  # the integers u, v and sparse were dequantized from (compress --bits)
    factor_masks: tuple[torch.Tensor, torch.Tensor] | None = None  # supports of U and V when they are block-sparse (hss)


def block_file(index: int) -> str:
    return f"blocks/block-{index:04d}.safetensors"


def encode_layer(name: str, layer: CompressedTensors) -> dict[str, torch.Tensor]:
    mask = layer.mask.flatten()
    tensors = {f"{name}.s_mask": torch.from_numpy(np.packbits(mask.numpy()))}
    if layer.factor_masks is not None:
        if layer.quantized is not None:
            raise ValueError(f"layer {name}: block-sparse factors are stored in fp32 only")
        tensors[f"{name}.s_values"] = layer.sparse.flatten()[mask].contiguous()
        tensors[f"{name}.factor_shape"] = torch.tensor([*layer.u.shape, layer.v.shape[1]], dtype=torch.int64)
        for part, matrix, support in zip(("u", "v"), (layer.u, layer.v), layer.factor_masks):
            tensors[f"{name}.{part}_mask"] = torch.from_numpy(np.packbits(support.flatten().numpy()))
            tensors[f"{name}.{part}_values"] = matrix[support].contiguous()
    elif layer.quantized is None:
        tensors.update({f"{name}.u": layer.u.contiguous(), f"{name}.v": layer.v.contiguous(),
                        f"{name}.s_values": layer.sparse.flatten()[mask].contiguous()})
    else:
        factors = layer.quantized
        for part, matrix in (("u", factors.u), ("v", factors.v)):
            tensors.update({f"{name}.{part}_q": matrix.q.contiguous(), f"{name}.{part}_scales": matrix.scales.contiguous()})
        tensors.update({f"{name}.s_q": factors.sparse.q.flatten()[mask].contiguous(),
                        f"{name}.s_scales": factors.sparse.scales.contiguous()})
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.contiguous()
    return tensors


def _unmasked(name: str, part: str, packed: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rows x cols matrix from its packed support and kept values (S's storage), and the support; every count checked."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (rows * cols + 7) // 8:
        raise UserError(f"layer {name}: {part}'s mask does not hold {rows}x{cols} bits: the checkpoint is corrupt")
    mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=rows * cols).astype(bool)).reshape(rows, cols)
    if values.dim() != 1 or values.numel() != int(mask.sum()):
        raise UserError(f"layer {name}: {values.numel()} {part} values for {int(mask.sum())} mask bits: the checkpoint is corrupt")
    matrix = torch.zeros(rows * cols, dtype=values.dtype)
    matrix[mask.flatten()] = values
    return matrix.reshape(rows, cols), mask


def decode_layer(name: str, tensors: dict[str, torch.Tensor], grid: Grid | None = None) -> CompressedTensors:
    """One Linear from its tensors; a quantized one (its manifest's `grid`) is dequantized for torch, integers kept."""
    bias = tensors.get(f"{name}.bias")
    shape = tensors.get(f"{name}.factor_shape")
    if shape is not None:  # block-sparse U and V (hss)
        if grid is not None or shape.dtype != torch.int64 or shape.shape != (3,) or int(shape.min()) < 0:
            raise UserError(f"layer {name}: its factor shape or the manifest's quantization is invalid: the checkpoint is corrupt")
        rows, rank, cols = shape.tolist()
        sparse, mask = _unmasked(name, "sparse", tensors[f"{name}.s_mask"], tensors[f"{name}.s_values"], rows, cols)
        u, u_mask = _unmasked(name, "U", tensors[f"{name}.u_mask"], tensors[f"{name}.u_values"], rows, rank)
        v, v_mask = _unmasked(name, "V", tensors[f"{name}.v_mask"], tensors[f"{name}.v_values"], rank, cols)
        return CompressedTensors(u, v, sparse, mask, bias, factor_masks=(u_mask, v_mask))
    if (grid is None) != (f"{name}.u" in tensors):
        raise UserError(f"layer {name}: its tensors and the manifest's quantization disagree: the checkpoint is corrupt")
    suffix = "" if grid is None else "_q"
    rows, cols = tensors[f"{name}.u{suffix}"].shape[0], tensors[f"{name}.v{suffix}"].shape[1]
    sparse, mask = _unmasked(name, "sparse", tensors[f"{name}.s_mask"], tensors[f"{name}.s_values" if grid is None else f"{name}.s_q"],
                             rows, cols)
    if grid is None:
        return CompressedTensors(tensors[f"{name}.u"], tensors[f"{name}.v"], sparse, mask, bias)
    factors = QuantizedFactors(grid, Quantized(sparse, tensors[f"{name}.s_scales"]),
                               *(Quantized(tensors[f"{name}.{part}_q"], tensors[f"{name}.{part}_scales"]) for part in ("u", "v")))
    for part in (factors.sparse, factors.u, factors.v):  # model files are untrusted: the exports pack these as they are
        part_rows, part_cols = part.q.shape
        if (part.q.dtype != torch.int8 or part.scales.shape != (part_rows, grid.groups(part_cols))
                or (part.q.numel() and (int(part.q.min()) < grid.qmin or int(part.q.max()) > grid.qmax))):
            raise UserError(f"layer {name}: integers or scales do not fit {grid.bits}-bit groups of {grid.group_size}: "
                            "the checkpoint is corrupt")
    return CompressedTensors(factors.u.dequantize(grid), factors.v.dequantize(grid), factors.sparse.dequantize(grid), mask, bias,
                             factors)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_file_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"could not read {path} ({exc}): the file is corrupt or truncated") from None


class CheckpointWriter:
    """Builds a checkpoint block by block under `.NAME.partial`, publishing it only when complete."""

    def __init__(self, out: Path, fingerprint: dict, resume: bool):
        self.out = out
        self.work = partial_path(out)
        self.fingerprint = fingerprint
        self.completed = 0
        self.layers: list[dict] = []
        self.allocation: dict | None = None  # a global split, kept so that --resume continues with the same one
        progress = self.work / PROGRESS
        if resume and progress.is_file():
            state = json.loads(progress.read_text())
            if state["fingerprint"] != fingerprint:
                raise UserError(
                    f"{self.work} was started with other settings or another model: delete it or rerun with the same flags"
                )
            self.completed, self.layers, self.allocation = state["completed_blocks"], state["layers"], state.get("allocation")
        elif self.work.exists() and not resume:
            raise UserError(f"an unfinished run exists at {self.work}: pass --resume to continue it or delete the folder")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)

    def discard_if_empty(self) -> None:
        if self.completed == 0:
            shutil.rmtree(self.work, ignore_errors=True)

    def load_hidden(self) -> torch.Tensor:
        return _load_tensors(self.work / HIDDEN)["hidden"]

    def load_block(self, index: int, grid: Grid | None) -> dict[str, CompressedTensors]:
        return read_block(self.work, index, grid)

    def save_block(self, index: int, layers: dict[str, CompressedTensors], reports: list[dict], hidden: torch.Tensor) -> None:
        """Block file, then the activations the next block needs, then the progress record that points at both."""
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            tensors.update(encode_layer(name, layer))
        save_tensors(self.work / block_file(index), tensors)
        save_tensors(self.work / HIDDEN, {"hidden": hidden.contiguous()})
        self.completed = index + 1
        self.layers.extend(reports)
        self._write_progress()

    def save_allocation(self, allocation: dict) -> None:
        """The split chosen before the first block, recorded before any block is written."""
        self.allocation = allocation
        self._write_progress()

    def _write_progress(self) -> None:
        state = {"fingerprint": self.fingerprint, "completed_blocks": self.completed, "layers": self.layers}
        if self.allocation is not None:
            state["allocation"] = self.allocation
        write_json_atomic(self.work / PROGRESS, state)

    def finish(self, loaded: LoadedModel, compressed_names: set[str], manifest: dict) -> dict:
        model = loaded.model
        skip = {f"{name}.{param}" for name in compressed_names for param in ("weight", "bias", "sparse", "u", "v")}
        dense = {key: value.contiguous() for key, value in model.state_dict().items() if key not in skip}
        if getattr(model.config, "tie_word_embeddings", False):
            dense.pop("lm_head.weight", None)
        save_tensors(self.work / "dense.safetensors", dense)
        model.config.save_pretrained(self.work)
        loaded.tokenizer.save_pretrained(self.work)
        for leftover in (PROGRESS, HIDDEN):
            (self.work / leftover).unlink(missing_ok=True)
        dense_params = sum(value.numel() for value in dense.values())
        manifest = {**manifest, "dense_params": dense_params, "model_params_after": dense_params + manifest["params_kept"]}
        return publish_checkpoint(self.work, self.out, manifest)


def publish_checkpoint(work: Path, out: Path, manifest: dict) -> dict:
    """Hash every file of a finished work folder into its manifest, write the manifest last, rename the folder to `out`."""
    files = file_inventory(work)
    manifest = {
        **manifest,
        "bytes": {
            "compressed_layers": sum(f["bytes"] for name, f in files.items() if name.startswith("blocks/")),
            "dense_part": files["dense.safetensors"]["bytes"],
            "total": sum(f["bytes"] for f in files.values()),
        },
        "files": files,
    }
    write_json_atomic(work / MANIFEST, manifest)
    publish_directory(work, out)
    return manifest


def read_block(folder: Path, index: int, grid: Grid | None = None) -> dict[str, CompressedTensors]:
    """One block's Linears; `grid` is the manifest's (checkpoint_grid), None for an fp32 checkpoint."""
    tensors = _load_tensors(folder / block_file(index))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: decode_layer(name, tensors, grid) for name in names}


def checkpoint_grid(manifest: dict) -> Grid | None:
    """The integer grid a checkpoint's factors lie on (compress --bits), None for fp32."""
    quantization = manifest.get("quantization")
    return None if quantization is None else Grid(quantization["bits"], quantization["group_size"])


def read_manifest(folder: Path, verify: bool = True) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        hint = " (an unfinished run? see --resume)" if partial_path(folder).exists() else ""
        raise UserError(f"{folder} is not a complete sslc-export checkpoint: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a valid manifest ({exc}): re-create the checkpoint") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{path} has format_version {manifest.get('format_version')}; this tool reads "
                        f"{' and '.join(map(str, READABLE_VERSIONS))}")
    if verify:
        verify_inventory(folder, files)
    return manifest


def load_checkpoint(folder: Path) -> tuple[LoadedModel, dict]:
    """Rebuild the model with every compressed Linear as a SparseLowRankLinear."""
    manifest = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    architecture = architecture_for(config.model_type)
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    for index in range(manifest["num_blocks"]):
        for name, layer in read_block(folder, index, checkpoint_grid(manifest)).items():
            try:
                replace_linear(model, name, SparseLowRankLinear(layer.sparse, layer.u, layer.v, layer.bias))
            except AttributeError:
                raise UserError(f"{folder}: layer {name} does not exist in its config: the checkpoint is corrupt") from None
    missing, unexpected = model.load_state_dict(_load_tensors(folder / "dense.safetensors"), strict=False, assign=True)
    model.tie_weights()
    still_empty = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if still_empty or unexpected:
        raise UserError(f"{folder} does not match its config: missing {still_empty[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fix_end_token(tokenizer, config)
    identity = {"source": str(folder), "kind": "checkpoint", "sha256": manifest["files"]["dense.safetensors"]["sha256"]}
    return LoadedModel(model, tokenizer, architecture, identity), manifest


def load_model_or_checkpoint(path: str | None) -> LoadedModel:
    """A checkpoint folder (has a manifest, or is a partial run) or anything models.load_model takes."""
    if path is not None:
        folder = Path(path)
        if (folder / MANIFEST).exists() or (folder / PROGRESS).exists() or partial_path(folder).exists():
            return load_checkpoint(folder)[0]
    return load_model(path)
