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
    quantized (compress --bits; manifest "quantization": bits, group_size, scales), instead of u, v and
    s_values: the integers and fp32 scales per (row, group of input columns)
        <linear>.u_q <linear>.u_scales  <linear>.v_q <linear>.v_scales
        <linear>.s_q (S's kept integers in mask order)  <linear>.s_scales
    the integers are int8 matrices at 8 bits (format_version 2); at 4 bits two to a byte, each part
    flattened (format_version 3; version 2 stored them as int8 too), with <linear>.q_shape (m, r, n)

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
from sslc_export.quantization import Grid, Quantized, QuantizedFactors, pack_int4, unpack_int4

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
HIDDEN = "progress-hidden.safetensors"
FORMAT_VERSION = 1
QUANTIZED_FORMAT_VERSION = 2  # integers and scales: an older tool must refuse, not misread
PACKED_INT4_FORMAT_VERSION = 3  # likewise for int4 integers two to a byte
READABLE_VERSIONS = (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION, PACKED_INT4_FORMAT_VERSION)


def format_version(grid: Grid | None) -> int:
    """The format_version of a checkpoint whose factors lie on `grid` (None: fp32)."""
    if grid is None:
        return FORMAT_VERSION
    return PACKED_INT4_FORMAT_VERSION if grid.bits == 4 else QUANTIZED_FORMAT_VERSION


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
        packed = factors.grid.bits == 4
        stored = pack_int4 if packed else torch.Tensor.contiguous
        for part, matrix in (("u", factors.u), ("v", factors.v)):
            tensors.update({f"{name}.{part}_q": stored(matrix.q), f"{name}.{part}_scales": matrix.scales.contiguous()})
        tensors.update({f"{name}.s_q": stored(factors.sparse.q.flatten()[mask]),
                        f"{name}.s_scales": factors.sparse.scales.contiguous()})
        if packed:
            tensors[f"{name}.q_shape"] = torch.tensor([*factors.u.q.shape, factors.v.q.shape[1]], dtype=torch.int64)
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.contiguous()
    return tensors


def _support(name: str, part: str, packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A rows x cols support from its packed bits, their count checked."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (rows * cols + 7) // 8:
        raise UserError(f"layer {name}: {part}'s mask does not hold {rows}x{cols} bits: the checkpoint is corrupt")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=rows * cols).astype(bool)).reshape(rows, cols)


def _unpacked_int4(name: str, part: str, packed: torch.Tensor, count: int) -> torch.Tensor:
    """`count` int4 integers stored two to a byte, as flat int8; their count checked."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 1) // 2:
        raise UserError(f"layer {name}: {part}'s int4 integers do not hold {count} values: the checkpoint is corrupt")
    return unpack_int4(packed, count)


def _unmasked(name: str, part: str, packed: torch.Tensor, values: torch.Tensor, rows: int, cols: int,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A rows x cols matrix from its packed support (or the support itself) and kept values (S's storage), and the
    support; every count checked."""
    if mask is None:
        mask = _support(name, part, packed, rows, cols)
    if values.dim() != 1 or values.numel() != int(mask.sum()):
        raise UserError(f"layer {name}: {values.numel()} {part} values for {int(mask.sum())} mask bits: the checkpoint is corrupt")
    matrix = torch.zeros(rows * cols, dtype=values.dtype)
    matrix[mask.flatten()] = values
    return matrix.reshape(rows, cols), mask


def _int4_integers(name: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A format-3 layer's integers unpacked (U and V as matrices, S's kept ones flat) and S's support."""
    shape = tensors[f"{name}.q_shape"]
    if shape.dtype != torch.int64 or shape.shape != (3,) or int(shape.min()) < 0:
        raise UserError(f"layer {name}: its integers' shape is invalid: the checkpoint is corrupt")
    rows, rank, cols = shape.tolist()
    mask = _support(name, "sparse", tensors[f"{name}.s_mask"], rows, cols)
    return (_unpacked_int4(name, "U", tensors[f"{name}.u_q"], rows * rank).reshape(rows, rank),
            _unpacked_int4(name, "V", tensors[f"{name}.v_q"], rank * cols).reshape(rank, cols),
            _unpacked_int4(name, "sparse", tensors[f"{name}.s_q"], int(mask.sum())), mask)


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
    if grid is None:
        rows, cols = tensors[f"{name}.u"].shape[0], tensors[f"{name}.v"].shape[1]
        sparse, mask = _unmasked(name, "sparse", tensors[f"{name}.s_mask"], tensors[f"{name}.s_values"], rows, cols)
        return CompressedTensors(tensors[f"{name}.u"], tensors[f"{name}.v"], sparse, mask, bias)
    if f"{name}.q_shape" in tensors:
        if grid.bits != 4:
            raise UserError(f"layer {name}: int4 integers in a {grid.bits}-bit checkpoint: the checkpoint is corrupt")
        u_q, v_q, s_q, mask = _int4_integers(name, tensors)
    else:
        u_q, v_q, s_q, mask = tensors[f"{name}.u_q"], tensors[f"{name}.v_q"], tensors[f"{name}.s_q"], None
    if u_q.dim() != 2 or v_q.dim() != 2:
        raise UserError(f"layer {name}: U's or V's integers are not a matrix: the checkpoint is corrupt")
    sparse, mask = _unmasked(name, "sparse", tensors[f"{name}.s_mask"], s_q, u_q.shape[0], v_q.shape[1], mask)
    factors = QuantizedFactors(grid, Quantized(sparse, tensors[f"{name}.s_scales"]), Quantized(u_q, tensors[f"{name}.u_scales"]),
                               Quantized(v_q, tensors[f"{name}.v_scales"]))
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
    if quantization is None:
        return None
    return Grid(quantization["bits"], quantization["group_size"], quantization.get("scales", "max"))  # max: before --scales


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
