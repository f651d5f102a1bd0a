"""The sequential driver: walk the decoder blocks once, hand each Linear to the method.

Block i is calibrated on the outputs of the already-compressed blocks 0..i-1. Inside a
block, input groups are compressed in order (q/k/v, o, gate/up, down), each group's
statistics gathered with the earlier groups already compressed (SparseGPT's "true
sequential" order; the walk itself is sslc_export/blockwalk.py). Methods see only a weight,
its statistics and a budget.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sslc_export.models.architectures import BlockInputs, Llama, check_targets
from sslc_export.models.loading import LoadedModel, load_model, resolve_source
from sslc_export import __version__, defaults
from sslc_export.sensitivity import output_weights
from sslc_export.allocation import Allocation, LossCurve, allocate, allocation_report, measure_curve
from sslc_export.atomic import check_writable_target
from sslc_export.blockwalk import walk_block
from sslc_export.budget import check_ratio, plan_budget, split_budget
from sslc_export.calibration import CalibrationSet, InputStatistics
from sslc_export.errors import UserError
from sslc_export.distributed import World, join
from sslc_export.checkpoint import CheckpointWriter, CompressedTensors, format_version
from sslc_export.layers import SparseLowRankLinear, replace_linear
from sslc_export.methods import Method, Settings, get_method
from sslc_export.patterns import Pattern
from sslc_export.memory import peak_rss_bytes

ProgressCallback = Callable[[int, int, str], None]  # (layers done, layers in all, what is next)


@dataclass(frozen=True)
class CompressJob:
    out: Path
    method: str = "sslc"
    ratio: float = defaults.RATIO
    model: str | None = None  # None: the bundled default
    pattern: Pattern = field(default_factory=Pattern)
    settings: Settings = field(default_factory=Settings)
    calib: str | None = None  # bundled names or a path (sslc_export/corpus.py); None: the mix of every bundled domain
    nsamples: int = defaults.NSAMPLES
    seqlen: int = defaults.SEQLEN
    batch_size: int = 8  # calibration sequences per forward pass
    resume: bool = False
    overwrite: bool = False
    streaming: bool = False  # one decoder block in memory at a time (safetensors folders)
    device: str = defaults.DEVICE  # where calibration passes and decompositions run; the model itself stays in host memory
    allocation: Allocation = field(default_factory=Allocation)  # how the budget is split over layers
    targets: str = "all"  # which Linears of each block are compressed: all, attn or mlp (the others stay dense)


@dataclass
class CompressOutcome:
    manifest: dict
    loaded: LoadedModel | None  # the in-memory compressed model (None when streamed: reload the checkpoint)


def compute_device(name: str) -> torch.device:
    """The torch device named by --device, checked before any work starts."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu, or install a CUDA build of torch on a GPU machine"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {name} is not supported: use cpu or cuda")
    return device


def _block_inputs(
    loaded: LoadedModel, tokens: torch.Tensor, hidden: torch.Tensor | None, batch_size: int, device: torch.device
) -> BlockInputs:
    """Embeddings, rotary tables and mask are computed in host memory, then moved to `device` with the activations."""
    return loaded.architecture.block_inputs(loaded.model, tokens, hidden, batch_size).to(device)


def fingerprint(job: CompressJob, model_identity: dict, calibration: CalibrationSet) -> dict:
    """What must match for --resume to continue a run rather than mix two, and for `compare` to reuse a
    checkpoint: the model's content hash, the method and its resolved settings, the calibration data."""
    identity = {
        "model_sha256": model_identity["sha256"],
        "method": job.method,
        "ratio": job.ratio,
        "pattern": asdict(job.pattern),
        "settings": job.settings.record(),
        "calibration": calibration_record(job, calibration),
    }
    if job.allocation.record() is not None:  # absent for uniform: checkpoints made before --allocation still match
        identity["allocation"] = job.allocation.record()
    if job.targets != "all":  # likewise for --targets
        identity["targets"] = job.targets
    return identity


def compress(job: CompressJob, progress: ProgressCallback | None = None) -> CompressOutcome:
    """Compress every decoder Linear of the model and write the checkpoint; under torchrun or accelerate launch the
    ranks share each block's decompositions and rank 0 writes (sslc_export/distributed.py)."""
    with join(job.device) as world:
        return world.together(lambda: _compress(job, world, progress if world.is_main else None))


def _compress(job: CompressJob, world: World, progress: ProgressCallback | None) -> CompressOutcome:
    method = get_method(job.method)
    check_ratio(job.ratio, quantized=job.settings.grid is not None)
    job.allocation.check(job.ratio, job.streaming)
    check_targets(job.targets)
    job = replace(job, settings=method.resolve(job.settings, job.pattern))
    method.check(job.pattern, job.settings)
    if job.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {job.batch_size}")
    device = compute_device(world.device(job.device))
    if world.is_main:
        check_writable_target(job.out, job.overwrite)
    calibration = CalibrationSet.read(job.calib)
    resolve_source(job.model)

    started = time.perf_counter()
    loaded = load_model(job.model, streaming=job.streaming)
    tokens = calibration.tokens(loaded.tokenizer, job.nsamples, job.seqlen, job.settings.seed)
    architecture = loaded.architecture
    blocks = architecture.blocks(loaded.model)
    targeted = architecture.targeted(job.targets)
    rank_ratio = method.rank_ratio(job.settings)
    for block in blocks:  # every budget error surfaces before anything is written (shapes work on meta too)
        for name in targeted:
            method.check_budget(plan_budget(*block.get_submodule(name).weight.shape, job.ratio, rank_ratio, job.pattern))
    # Rank 0 alone writes; the others learn where a resumed run stands from it.
    writer = CheckpointWriter(job.out, fingerprint(job, loaded.identity, calibration), job.resume) if world.is_main else None
    try:
        completed, allocation, hidden = world.broadcast(
            lambda: (writer.completed, writer.allocation, writer.load_hidden() if writer.completed else None))
        if job.allocation.mode == "global" and allocation is None:  # a resumed run keeps the split it started with
            allocation = _global_split(job, method, loaded, tokens, device, progress, world)
            if writer is not None:
                writer.save_allocation(allocation)
        kept = None if allocation is None else allocation["layers"]
        inputs = _block_inputs(loaded, tokens, hidden, job.batch_size, device)
        compressed_names = {f"{architecture.blocks_path}.{i}.{name}" for i in range(len(blocks)) for name in targeted}
        for index, block in enumerate(blocks):
            if index < completed:  # finished before a resume: its outputs are the saved hidden states
                if loaded.streamer:  # its norms and untargeted Linears are still to be written into dense.safetensors
                    loaded.streamer.load_block(index)
                    for name in targeted:
                        loaded.streamer.release(block.get_submodule(name))
                elif writer is not None:
                    for name, layer in writer.load_block(index, job.settings.grid).items():
                        replace_linear(loaded.model, name, SparseLowRankLinear(layer.sparse, layer.u, layer.v, layer.bias))
                continue
            if loaded.streamer:
                loaded.streamer.load_block(index)
            block.to(device)
            _compress_block(job, method, architecture, index, block, inputs, writer, progress, len(blocks), kept, world)
            block.to("cpu")  # the compressed block rejoins the model in host memory; the device holds one block at a time
            if loaded.streamer:  # written to the checkpoint: free it (the block's norms and untargeted Linears stay)
                for name in targeted:
                    loaded.streamer.release(block.get_submodule(name))
        ranks = world.gather(lambda: _rank_record(device))
    except BaseException:
        if writer is not None:
            writer.discard_if_empty()  # a failure before any block is saved leaves nothing; after, the folder is --resume's
        raise

    if writer is None:  # every rank returns the manifest rank 0 published; rank 0's model is the complete one
        return CompressOutcome(world.broadcast(lambda: None), None)
    manifest = _manifest(job, loaded, writer.layers, len(blocks), calibration, time.perf_counter() - started)
    manifest["allocation"] = writer.allocation
    manifest["distributed"] = {**world.record(), "ranks": ranks}
    published = writer.finish(loaded, compressed_names, manifest)
    world.broadcast(lambda: published)
    return CompressOutcome(published, None if loaded.streamer else loaded)


def _rank_record(device: torch.device) -> dict:
    """What one rank ran on and the most memory it held (the process's peak RSS; the device's peak on a GPU)."""
    return {"device": str(device), "peak_rss_bytes": peak_rss_bytes(),
            "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def _compress_block(
    job: CompressJob,
    method: Method,
    architecture: Llama,
    index: int,
    block: nn.Module,
    inputs: BlockInputs,
    writer: CheckpointWriter | None,
    progress: ProgressCallback | None,
    num_blocks: int,
    kept: dict[str, int] | None,
    world: World,
) -> None:
    """Compress one block's Linears group by group, then advance the activations through it; `kept` is a global
    split's parameters per layer (None: every layer at the job's ratio). A group's Linears are shared out over the
    ranks and every rank puts all of them into its block; `writer` is rank 0's (None on the others)."""
    prefix = f"{architecture.blocks_path}.{index}"
    rank_ratio = method.rank_ratio(job.settings)
    targeted = architecture.targeted(job.targets)
    layers: dict[str, CompressedTensors] = {}
    reports: list[dict] = []

    def decompose(name: str, stats: InputStatistics) -> tuple[CompressedTensors, dict]:
        linear = block.get_submodule(name)
        weight = linear.weight.detach().float()
        if kept is None:
            budget = plan_budget(*weight.shape, job.ratio, rank_ratio, job.pattern)
        else:
            budget = split_budget(*weight.shape, kept[f"{prefix}.{name}"], rank_ratio, job.pattern)
        layer_start = time.perf_counter()
        result = method.decompose(weight, stats, budget, job.pattern, job.settings)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        layer = CompressedTensors(result.u.cpu(), result.v.cpu(), result.sparse.cpu(), result.mask.cpu(), bias,
                                  None if result.quantized is None else result.quantized.to("cpu"),
                                  None if result.factor_masks is None else tuple(m.cpu() for m in result.factor_masks))
        nnz = int(result.mask.sum())
        report = {
            "name": f"{prefix}.{name}",
            "shape": list(weight.shape),
            "ratio": round(1.0 - budget.allowed / weight.numel(), 6),
            "rank": result.rank,
            "nnz": nnz,
            "params_kept": result.params(),
            "params_total": weight.numel(),
            "params_allowed": budget.allowed,
            "relative_loss": stats.relative_error(weight, result.dense()),
            "iterations": result.iterations,
            "seconds": round(time.perf_counter() - layer_start, 3),
        }
        return layer, report

    def compress_group(names: tuple[str, ...], stats: InputStatistics) -> None:
        names = tuple(name for name in names if name in targeted)
        if not names:
            return
        owners = world.owners([block.get_submodule(name).weight.numel() for name in names])
        mine = [name for name, owner in zip(names, owners) if owner == world.rank]

        def decompose_mine() -> dict[str, tuple[CompressedTensors, dict]]:
            done = {}
            for name in mine:
                if progress:
                    per_block = len(targeted)
                    progress(index * per_block + len(reports) + len(done), num_blocks * per_block, f"block {index} {name}")
                done[name] = decompose(name, stats)
            return done

        results = world.share(decompose_mine)
        for name in names:  # in the block's order, whichever rank computed it
            layer, report = results[name]
            layers[f"{prefix}.{name}"] = layer
            reports.append(report)
            on = block.get_submodule(name).weight.device
            replace_linear(block, name, SparseLowRankLinear(layer.sparse.to(on), layer.u.to(on), layer.v.to(on),
                                                            None if layer.bias is None else layer.bias.to(on)))

    inputs.hidden = walk_block(block, architecture, inputs, compress_group)
    if writer is not None:
        writer.save_block(index, layers, reports, inputs.hidden.cpu())


def _global_split(
    job: CompressJob, method: Method, loaded: LoadedModel, tokens: torch.Tensor, device: torch.device,
    progress: ProgressCallback | None, world: World,
) -> dict:
    """The first pass of --allocation global: every Linear's loss curve on the dense model's block inputs (the same
    walk as compression, nothing replaced; a group's curves shared out over the ranks like its decompositions),
    then the split of the model-wide budget, the same on every rank."""
    started = time.perf_counter()
    architecture = loaded.architecture
    blocks = architecture.blocks(loaded.model)
    inputs = _block_inputs(loaded, tokens, None, job.batch_size, device)
    curves: dict[str, LossCurve] = {}
    targeted = architecture.targeted(job.targets)
    layers_in_all = len(blocks) * len(targeted)
    for index, block in enumerate(blocks):
        prefix = f"{architecture.blocks_path}.{index}"
        if loaded.streamer:
            loaded.streamer.load_block(index)
        block.to(device)

        def measure(names: tuple[str, ...], stats: InputStatistics) -> None:
            names = tuple(name for name in names if name in targeted)
            owners = world.owners([block.get_submodule(name).weight.numel() for name in names])

            def measure_mine() -> dict[str, LossCurve]:
                measured = {}
                for name, owner in zip(names, owners):
                    if owner != world.rank:
                        continue
                    if progress:
                        progress(len(curves) + len(measured), layers_in_all, f"loss curves: block {index} {name}")
                    weight = block.get_submodule(name).weight.detach().float()
                    measured[f"{prefix}.{name}"] = measure_curve(method, weight, stats, job.ratio, job.allocation,
                                                                 job.pattern, job.settings)
                return measured

            shared = world.share(measure_mine)
            curves.update((f"{prefix}.{name}", shared[f"{prefix}.{name}"]) for name in names)  # the block's order

        walk_block(block, architecture, inputs, measure)
        block.to("cpu")
        if loaded.streamer:  # loaded again by the compression pass
            for name in targeted:
                loaded.streamer.release(block.get_submodule(name))
    if progress:
        progress(layers_in_all, layers_in_all, "output sensitivity: one backward pass of the dense model")
    weights = world.broadcast(lambda: _output_weights(loaded, tokens, device, targeted))
    for name, curve in curves.items():
        curve.weight = weights[name]
    budget = math.floor((1.0 - job.ratio) * sum(m * n for m, n in (curve.shape for curve in curves.values())))
    kept = allocate(curves, budget)
    return {**allocation_report(curves, kept, budget, job.allocation), "seconds": round(time.perf_counter() - started, 1)}


def _output_weights(loaded: LoadedModel, tokens: torch.Tensor, device: torch.device, targeted: tuple[str, ...]) -> dict[str, float]:
    """What each compressed Linear's relative loss² costs the model (sslc_export/sensitivity.py), on the whole dense model."""
    architecture = loaded.architecture
    linears = {f"{architecture.blocks_path}.{index}.{name}": block.get_submodule(name)
               for index, block in enumerate(architecture.blocks(loaded.model)) for name in targeted}
    loaded.model.to(device)
    try:
        return output_weights(loaded.model, linears, tokens.to(device))
    finally:
        loaded.model.to("cpu")


def _memory_limits() -> dict:
    """The memory budget the run had, so its peak-memory figure states what it fitted in:
    RLIMIT_AS (prlimit --as, ulimit -v) and a cgroup memory limit (v1 or v2), where set."""
    limits = {}
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY:
        limits["address_space_bytes"] = address_space
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            if controllers == "memory":
                limit_file = Path("/sys/fs/cgroup/memory") / group.lstrip("/") / "memory.limit_in_bytes"
            elif controllers == "":
                limit_file = Path("/sys/fs/cgroup") / group.lstrip("/") / "memory.max"
            else:
                continue
            value = limit_file.read_text().strip() if limit_file.is_file() else "max"
            if value != "max" and int(value) < 1 << 60:
                limits["cgroup_bytes"] = int(value)
    except (OSError, ValueError):
        pass  # not Linux, or no readable cgroup: no limit to record
    return limits


def calibration_record(job: CompressJob, calibration: CalibrationSet) -> dict:
    """What calibrated a checkpoint (part of its fingerprint)."""
    return {"source": job.calib or "mix", "texts": calibration.record(job.nsamples), "nsamples": job.nsamples, "seqlen": job.seqlen}


def _manifest(
    job: CompressJob, loaded: LoadedModel, layers: list[dict], num_blocks: int, calibration: CalibrationSet, seconds: float
) -> dict:
    identity = fingerprint(job, loaded.identity, calibration)  # its calibration record is the manifest's
    kept = sum(layer["params_kept"] for layer in layers)
    total = sum(layer["params_total"] for layer in layers)
    return {
        "format_version": format_version(job.settings.grid),
        "tool": {"name": "sslc-export", "version": __version__, "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": loaded.identity,
        "model_type": loaded.model.config.model_type,
        "num_blocks": num_blocks,
        "quantization": None if job.settings.grid is None else job.settings.grid.record(),
        "method": job.method,
        "ratio": job.ratio,
        "pattern": asdict(job.pattern),
        "targets": job.targets,
        "settings": asdict(job.settings),
        "calibration": identity["calibration"],
        "fingerprint": identity,
        "params_kept": kept,
        "params_total": total,
        "compression_seconds": round(seconds, 1),
        "streaming": job.streaming,
        "device": job.device,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if job.device.startswith("cuda") else None,
        "peak_rss_bytes": peak_rss_bytes(),  # whole process, so far
        "memory_limits": _memory_limits(),
        "threads": torch.get_num_threads(),
        "layers": layers,
    }
