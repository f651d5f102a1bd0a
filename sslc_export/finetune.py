"""Recovery fine-tuning of a checkpoint (the paper's last step): each compressed Linear's U and V are
trained; S, its mask, biases, embeddings, norms and head stay frozen and no parameter is added, so the
new checkpoint has exactly its parent's shape and size (block-sparse factors, hss's, stay zero outside their supports). fp32 factors are balanced first (U·V unchanged): the
SVD step leaves the singular values in U (entries ~5 against ~0.002 in V on SmolLM2), and Adam, which moves
every entry by about the learning rate, then changes V by percents per step.

The loss is distillation to the dense model's logits (KL(teacher || student) per token) or plain
next-token cross-entropy, on windows of the calibration text; by default cross-entropy for an fp32 parent and
distillation on a grid, the loss that measured better for each (docs/results.md). A quantized checkpoint (compress --bits)
trains on its grid: U and V are held in grid units (the stored integers to start with) and each (row,
group) scale is trained as a log; the forward pass rounds the units (the gradient passes the rounding
unchanged: straight-through estimator) and multiplies by the scales. Adam moves every entry by about its
learning rate, so the units' rate is in grid steps (--grid-lr) and the scales' is a relative change
(--scale-lr): with the fp32 rate on the fp32 latent, 64 steps never moved an entry across a rounding
boundary. S's per-group scales are trained as well by default (its integers and mask stay frozen, nothing is
added): on SmolLM2 int4 that won back about a quarter more perplexity than U and V alone (docs/results.md).
The new checkpoint stores the integers and scales of the last forward pass, so the model that was trained is
(up to the last step) the model that ships, and no rounding after training adds an error that nothing in the
model (S's values are frozen) can absorb.

While it runs the output is `.NAME.partial`, holding the step, the optimizer and the trained
factors for --resume; batches and learning rate depend only on the step, so a resumed run ends
with the same tensors as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sslc_export.models.loading import LoadedModel, load_model
from sslc_export import __version__, defaults
from sslc_export.atomic import check_writable_target, partial_path, sha256_file, write_file_atomic, write_json_atomic
from sslc_export.calibration import CalibrationSet
from sslc_export.checkpoint import (MANIFEST, CompressedTensors, block_file, checkpoint_grid, encode_layer, format_version,
                                    load_checkpoint, publish_checkpoint, read_block, save_tensors)
from sslc_export.errors import UserError
from sslc_export.layers import SparseLowRankLinear
from sslc_export.lowrank import balance
from sslc_export.quantization import Grid, Quantized, QuantizedFactors

LOSSES = ("distill", "lm")
STATE = "finetune-state.pt"
PROGRESS = "finetune-progress.json"
ProgressCallback = Callable[[int, int, float], None]  # (steps done, steps in all, loss of the last step)


@dataclass(frozen=True)
class FinetuneJob:
    checkpoint: Path
    out: Path
    loss: str | None = None  # None: lm for an fp32 parent, distill on a grid (defaults.FINETUNE_LOSS_*)
    steps: int = defaults.FINETUNE_STEPS
    lr: float = defaults.FINETUNE_LR
    grid_lr: float = defaults.FINETUNE_GRID_LR  # quantized U, V: grid steps per step
    scale_lr: float = defaults.FINETUNE_SCALE_LR  # their log scales
    sparse_scales: bool | None = None  # on a grid: S's per-group scales trained too (integers, mask frozen); None: yes
    seqlen: int = defaults.FINETUNE_SEQLEN
    batch_size: int = defaults.FINETUNE_BATCH
    calib: str | None = None  # None: the parent's calibration choice
    teacher: str | None = None  # dense model for --loss distill; None: the parent's source model
    seed: int = defaults.SEED
    save_every: int = defaults.FINETUNE_SAVE_EVERY  # steps between --resume points
    resume: bool = False
    overwrite: bool = False


class OnGrid(nn.Module):
    """Parametrization of a quantized factor: the original is the factor in grid units; forward rounds it
    (straight-through) and multiplies each (row, group) by its scale, itself trained through its log."""

    def __init__(self, grid: Grid, scales: torch.Tensor, cols: int):
        super().__init__()
        self.grid = grid
        self.cols = cols
        self.register_buffer("live", scales > 0)  # an all-zero group stays zero
        self.log_scale = nn.Parameter(torch.log(torch.where(self.live, scales, torch.ones_like(scales))))

    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scale) * self.live

    def integers(self, units: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(units), self.grid.qmin, self.grid.qmax) * self.grid.expand(self.live, self.cols)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        rounded = units + (self.integers(units) - units).detach()
        return rounded * self.grid.expand(self.scales(), self.cols)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """The stored dequantized factor back to grid units (its integers, exactly)."""
        return torch.round(value / self.grid.expand(torch.exp(self.log_scale.detach()), self.cols))


class OnSupport(nn.Module):
    """Parametrization of a block-sparse factor (hss): zero outside its support, so training keeps its structure and
    its parameter count."""

    def __init__(self, support: torch.Tensor):
        super().__init__()
        self.register_buffer("support", support)

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return factor * self.support


class Rescaled(nn.Module):
    """Parametrization of a quantized S: each (row, group) of its stored values times a trained factor (as a log),
    so S's integers and mask stay as they are and only its scales move."""

    def __init__(self, grid: Grid, groups: int, rows: int, cols: int):
        super().__init__()
        self.grid = grid
        self.cols = cols
        self.log_factor = nn.Parameter(torch.zeros(rows, groups))

    def factors(self) -> torch.Tensor:
        return torch.exp(self.log_factor)

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return sparse * self.grid.expand(self.factors(), self.cols)


def check_job(job: FinetuneJob) -> None:
    """Every flag checked before the models are loaded (but --teacher against the loss, which may be the parent's
    default: finetune checks it once the job is resolved)."""
    if job.loss is not None and job.loss not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got '{job.loss}'")
    if job.steps < 1 or job.batch_size < 1 or job.save_every < 1:
        raise UserError(f"--steps, --batch-size and --save-every must be >= 1, got {job.steps}, {job.batch_size}, {job.save_every}")
    for flag, value in (("--lr", job.lr), ("--grid-lr", job.grid_lr), ("--scale-lr", job.scale_lr)):
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} must be a positive number, got {value}")
    if job.seqlen < 2:
        raise UserError(f"--seqlen must be >= 2, got {job.seqlen}")
    if job.out.resolve() == job.checkpoint.resolve():
        raise UserError("--out must differ from the checkpoint: fine-tuning writes a new checkpoint beside its parent")


def finetune(job: FinetuneJob, progress: ProgressCallback | None = None) -> dict:
    """Train U and V of every compressed Linear of job.checkpoint and write job.out; returns its manifest."""
    check_job(job)
    student, manifest = load_checkpoint(job.checkpoint)  # a missing or corrupt checkpoint fails here
    parent_hash = sha256_file(job.checkpoint / MANIFEST)  # the manifest hashes every file: one hash names the whole parent
    if job.seqlen > student.model.config.max_position_embeddings:
        raise UserError(f"--seqlen {job.seqlen} is longer than the model's {student.model.config.max_position_embeddings} positions")
    if job.sparse_scales and checkpoint_grid(manifest) is None:
        raise UserError(f"--sparse-scales needs a quantized checkpoint (compress --bits 8|4); {job.checkpoint} is fp32")
    job = _resolved(job, manifest)
    if job.teacher is not None and job.loss != "distill":
        raise UserError(f"--teacher is only read by --loss distill (this run's loss is {job.loss}; an fp32 checkpoint's "
                        "default is lm)")
    calibration = CalibrationSet.read(None if job.calib == "mix" else job.calib)
    if not job.resume:
        check_writable_target(job.out, job.overwrite)
    grid = checkpoint_grid(manifest)
    layers = {index: read_block(job.checkpoint, index, grid) for index in range(manifest["num_blocks"])}
    trainable = _make_trainable(student.model, layers, grid, job.sparse_scales)
    if not any(trainable.values()):
        raise UserError(f"{job.checkpoint} has no low-rank factors (rank 0 everywhere): nothing to fine-tune")
    teacher = _teacher(job, manifest) if job.loss == "distill" else None
    tokens = calibration.tokens(student.tokenizer, job.steps * job.batch_size, job.seqlen, job.seed)
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(job.seed))  # domains mixed in every batch
    tokens = tokens[order]

    record = {"parent": {"path": str(job.checkpoint), "manifest_sha256": parent_hash}, "settings": _settings(job, grid is not None),
              "calibration": calibration.record(job.steps * job.batch_size),
              "teacher": None if teacher is None else teacher.identity,
              "quantized_factors": None if grid is None else "trained in grid units (straight-through) with trained scales"
              + ("; S's scales trained" if job.sparse_scales else "")}
    rates = {"factors": job.lr if grid is None else job.grid_lr, "scales": job.scale_lr}
    optimizer = torch.optim.Adam([{"params": list(params.values()), "name": kind, "base_lr": rates[kind]}
                                  for kind, params in trainable.items() if params])
    state = _State(partial_path(job.out), record, job.resume)
    step, losses = state.load(trainable, optimizer)
    student.model.eval()  # no dropout: a step is a function of its batch
    try:
        while step < job.steps:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * schedule(job, step)
            batch = tokens[step * job.batch_size : (step + 1) * job.batch_size]
            loss = _loss(job.loss, student.model, teacher, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(round(loss.item(), 5))
            if step % job.save_every == 0 and step < job.steps:
                state.save(step, losses, trainable, optimizer)
            if progress:
                progress(step, job.steps, losses[-1])
    except UserError:
        state.discard_if_empty()
        raise
    record.update(seconds=round(state.seconds_before + time.perf_counter() - state.started, 3), losses=losses,
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return _write(job, state.work, manifest, layers, student, grid, record)


def _resolved(job: FinetuneJob, manifest: dict) -> FinetuneJob:
    """The job with its defaults that depend on the parent filled in: its calibration, the loss, and S's scales trained
    on a grid."""
    on_grid = checkpoint_grid(manifest) is not None
    loss = job.loss or (defaults.FINETUNE_LOSS_GRID if on_grid else defaults.FINETUNE_LOSS_FP32)
    return replace(job, calib=job.calib or manifest["calibration"]["source"], loss=loss,
                   sparse_scales=on_grid and job.sparse_scales is not False)


def _settings(job: FinetuneJob, on_grid: bool) -> dict:
    """What the record keeps of a job (its calibration resolved): with the parent's hash, what makes two runs the same.
    Only the learning rates that act on the parent (fp32: --lr; on a grid: --grid-lr, --scale-lr)."""
    unused = ("lr",) if on_grid else ("grid_lr", "scale_lr", "sparse_scales")
    return {key: value for key, value in asdict(job).items() if key not in ("checkpoint", "out", "resume", "overwrite", *unused)}


def finished(job: FinetuneJob) -> dict | None:
    """job.out's manifest if it is a finished run of this job on the parent as it is now (same manifest hash, same
    settings), so `compare` can reuse it; None otherwise."""
    path = job.out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    record = manifest.get("finetune") or {}
    parent = json.loads((job.checkpoint / MANIFEST).read_text())
    expected = _settings(_resolved(job, parent), checkpoint_grid(parent) is not None)
    if record.get("parent", {}).get("manifest_sha256") != sha256_file(job.checkpoint / MANIFEST) or record.get("settings") != expected:
        return None
    return manifest


def schedule(job: FinetuneJob, step: int) -> float:
    """The learning rates' factor: linear warm-up over the first eighth of the steps (Adam's first steps move every
    entry by about lr, whatever its gradient's size), then linear decay to 0; a function of the step alone, so
    --resume repeats it."""
    warmup = max(1, job.steps // 8)
    return min((step + 1) / warmup, (job.steps - step) / (job.steps - warmup + 1))


def _make_trainable(model: nn.Module, layers: dict[int, dict[str, CompressedTensors]], grid: Grid | None,
                    sparse_scales: bool = False) -> dict[str, dict[str, nn.Parameter]]:
    """Freeze everything, then open U and V (in grid units behind the rounding, with their scales, on a grid; and S's
    scales with `sparse_scales`): {"factors": name -> tensor, "scales": name -> log scales (empty in fp32)}."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable: dict[str, dict[str, nn.Parameter]] = {"factors": {}, "scales": {}}
    for block in layers.values():
        for name, layer in block.items():
            module = model.get_submodule(name)
            if not isinstance(module, SparseLowRankLinear) or module.rank == 0:
                continue
            if grid is None:  # Adam moves every entry by about lr: U and V must be on one scale (see balance)
                with torch.no_grad():
                    u, v = balance(module.u, module.v)
                    module.u.copy_(u)
                    module.v.copy_(v)
            for index, part in enumerate(("u", "v")):
                if layer.factor_masks is not None:
                    parametrize.register_parametrization(module, part, OnSupport(layer.factor_masks[index]))
                    parameter = module.parametrizations[part].original
                elif grid is not None:
                    factor = getattr(layer.quantized, part)
                    parametrize.register_parametrization(module, part, OnGrid(grid, factor.scales, factor.q.shape[1]))
                    parameter = module.parametrizations[part].original
                    trainable["scales"][f"{name}.{part}.log_scale"] = module.parametrizations[part][0].log_scale
                else:
                    parameter = getattr(module, part)
                trainable["factors"][f"{name}.{part}"] = parameter
            if sparse_scales:
                sparse = layer.quantized.sparse
                parametrize.register_parametrization(module, "sparse", Rescaled(grid, sparse.scales.shape[1], *sparse.q.shape))
                trainable["scales"][f"{name}.sparse.log_factor"] = module.parametrizations["sparse"][0].log_factor
    for params in trainable.values():
        for parameter in params.values():
            parameter.requires_grad_(True)
    return trainable


def _teacher(job: FinetuneJob, manifest: dict) -> LoadedModel:
    """The dense model the checkpoint was compressed from (its content hash must match the manifest's)."""
    expected = manifest["source_model"]
    teacher = load_model(job.teacher or expected["source"])
    if teacher.identity["sha256"] != expected["sha256"]:
        raise UserError(f"the teacher {teacher.identity['source']} is not the model the checkpoint was compressed from "
                        f"(sha256 {teacher.identity['sha256'][:12]}, manifest {expected['sha256'][:12]}): pass that model as --teacher")
    teacher.model.eval()
    for parameter in teacher.model.parameters():
        parameter.requires_grad_(False)
    return teacher


def _loss(kind: str, model: nn.Module, teacher: LoadedModel | None, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch).logits.float()
    if kind == "lm":
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    with torch.no_grad():
        target = F.log_softmax(teacher.model(batch).logits.float().flatten(0, 1), dim=-1)
    return F.kl_div(F.log_softmax(logits.flatten(0, 1), dim=-1), target, log_target=True, reduction="batchmean")


def _named(trainable: dict[str, dict[str, nn.Parameter]]) -> dict[str, nn.Parameter]:
    return {name: parameter for params in trainable.values() for name, parameter in params.items()}


class _State:
    """The `.NAME.partial` folder of a run: what --resume needs, and a record that refuses other settings."""

    def __init__(self, work: Path, record: dict, resume: bool):
        self.work = work
        self.fingerprint = json.loads(json.dumps({key: record[key] for key in ("parent", "settings", "calibration")}))
        self.seconds_before = 0.0  # spent by the runs this one resumes
        self.started = time.perf_counter()
        self.step = 0
        progress = work / PROGRESS
        if resume and progress.is_file():
            saved = json.loads(progress.read_text())
            if saved["fingerprint"] != self.fingerprint:
                raise UserError(f"{work} was started with other settings or another checkpoint: delete it or rerun with the same flags")
            self.step = saved["step"]
        elif work.exists() and not resume:
            raise UserError(f"an unfinished run exists at {work}: pass --resume to continue it or delete the folder")
        else:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)

    def load(self, trainable: dict[str, dict[str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
        if self.step == 0:
            return 0, []
        saved = torch.load(self.work / STATE, weights_only=True)
        with torch.no_grad():
            for name, parameter in _named(trainable).items():
                parameter.copy_(saved["factors"][name])
        optimizer.load_state_dict(saved["optimizer"])
        self.seconds_before = saved["seconds"]
        return self.step, list(saved["losses"])

    def save(self, step: int, losses: list[float], trainable: dict[str, dict[str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> None:
        """The tensors first, then the progress record that points at them."""
        state = {"factors": {name: p.detach().clone() for name, p in _named(trainable).items()}, "optimizer": optimizer.state_dict(),
                 "losses": losses, "seconds": self.seconds_before + time.perf_counter() - self.started}
        write_file_atomic(self.work / STATE, lambda tmp: torch.save(state, tmp))
        write_json_atomic(self.work / PROGRESS, {"fingerprint": self.fingerprint, "step": step})

    def discard_if_empty(self) -> None:
        if not (self.work / PROGRESS).is_file():
            shutil.rmtree(self.work, ignore_errors=True)


def _write(job: FinetuneJob, work: Path, manifest: dict, layers: dict[int, dict[str, CompressedTensors]], student: LoadedModel,
           grid: Grid | None, record: dict) -> dict:
    """The parent's files with new U, V: S, masks, biases and the dense part are copied, so they stay bit-identical."""
    model = student.model
    for index, block in layers.items():
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in block.items():
            module = model.get_submodule(name)
            if module.rank:
                layer = _trained(module, layer, grid)
            tensors.update(encode_layer(name, layer))
        save_tensors(work / block_file(index), tensors)
    for item in job.checkpoint.iterdir():
        if item.is_file() and item.name != MANIFEST:
            shutil.copy2(item, work / item.name)
    for leftover in (STATE, PROGRESS):
        (work / leftover).unlink(missing_ok=True)
    fingerprint = {**manifest["fingerprint"], "finetune": {"parent": record["parent"]["manifest_sha256"], **record["settings"]}}
    new = {**manifest, "format_version": format_version(grid),  # the blocks are written anew, in this tool's layout
           "tool": {"name": "sslc-export", "version": __version__, "torch": torch.__version__},
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fingerprint": fingerprint, "finetune": record,
           "threads": torch.get_num_threads()}
    return publish_checkpoint(work, job.out, {key: value for key, value in new.items() if key not in ("files", "bytes")})


def _trained(module: SparseLowRankLinear, layer: CompressedTensors, grid: Grid | None) -> CompressedTensors:
    """One Linear's tensors with the trained U, V (on a grid: the integers its last forward pass used)."""
    if grid is None:
        return replace(layer, u=module.u.detach().clone(), v=module.v.detach().clone())
    factors = {}
    for part in ("u", "v"):
        rounding = module.parametrizations[part][0]
        with torch.no_grad():
            units = module.parametrizations[part].original
            factors[part] = Quantized(rounding.integers(units).to(torch.int8), rounding.scales().float().clone())
    sparse = layer.quantized.sparse
    if parametrize.is_parametrized(module, "sparse"):
        with torch.no_grad():
            sparse = Quantized(sparse.q, (sparse.scales * module.parametrizations["sparse"][0].factors()).float().clone())
    quantized = QuantizedFactors(grid, sparse, factors["u"], factors["v"])
    return replace(layer, u=factors["u"].dequantize(grid), v=factors["v"].dequantize(grid), sparse=sparse.dequantize(grid),
                   quantized=quantized)
