"""sslc-export: compress an LLM as sparse + low-rank, export it to ONNX, run and benchmark it.

Each command parses its flags, calls one stage function and prints; all the work lives in
the packages (models/, sslc_export/, runtimes/).
"""
from __future__ import annotations

import functools
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sslc_export import defaults
from sslc_export.atomic import check_output_path
from sslc_export.distributed import is_main_process
from sslc_export.errors import UserError, describe_os_error
from sslc_export.onnx.formats import help_text as format_help_text

app = typer.Typer(
    help=__doc__.split("\n")[0]
    + "\n\nTypical flow: `compress` (default model: bundled SmolLM2-135M) -> `eval` -> `compare` for a table of methods at equal budgets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: formulas such as [x, x·Vᵀ] or cuda[:N] must not be read as markup
)
console = Console(stderr=True)
out = Console()


OUTPUT_PARAMETERS = ("out_dir", "json_path", "report", "work_dir")  # commands' parameters naming something they write


def handles_user_errors(command):
    """Print a UserError as one line and exit 2: no traceback for mistakes a user can fix."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            for name in OUTPUT_PARAMETERS:  # fail before any work when an output path cannot be created
                if isinstance(kwargs.get(name), Path):
                    check_output_path(kwargs[name])
            return command(*args, **kwargs)
        except UserError as exc:
            if is_main_process():  # under a launcher every rank raises the same error: rank 0 prints it
                console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as exc:  # noqa: BLE001 - only named failures are caught; the rest re-raise as they were
            named = describe_os_error(exc)  # a full disk, a read-only file system: one line too
            if named is not None:
                console.print(f"[bold red]error:[/] {named}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            if not is_out_of_memory(exc):
                raise
            where = "GPU " if isinstance(exc, cuda_out_of_memory_types()) else ""
            console.print(f"[bold red]error:[/] {where}out of memory: free memory or raise the limit; for compress, --streaming "
                          "keeps one decoder block in memory (safetensors folder) and lower --nsamples / --seqlen "
                          "shrink the activations", highlight=False, soft_wrap=True)
            raise typer.Exit(3) from None

    return wrapper


def cuda_out_of_memory_types() -> tuple[type[BaseException], ...]:
    """torch's CUDA out-of-memory type, when torch is already loaded (a command that never imported it cannot raise it)."""
    torch = sys.modules.get("torch")
    return (torch.cuda.OutOfMemoryError,) if torch is not None else ()


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's and CUDA's out-of-memory errors by type; torch's CPU allocator raises a plain RuntimeError
    (torch 2.13), recognisable only by the allocator's name in its message."""
    if isinstance(exc, (MemoryError, *cuda_out_of_memory_types())):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc)


def set_threads(threads: Optional[int]) -> None:
    """Torch's thread count for the CPU work; the measured effect of the choice is in docs/results.md."""
    import torch

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


ModelOption = typer.Option(None, "--model", "-m", help="Hugging Face model folder or .gguf file; default: bundled SmolLM2-135M-Instruct.")
ThreadsOption = typer.Option(None, help="Torch CPU threads (default: all cores).")
JsonOption = typer.Option(None, "--json", help="Also write the reported figures to this JSON file.")
HELDOUT_HELP = "Held-out texts: comma-separated bundled names (prose = Alice, technical, code) or text files/folders; default: every bundled one."
HeldoutOption = typer.Option(None, "--heldout", "--text", help=HELDOUT_HELP)
TargetsOption = typer.Option("all", help="Which Linears of each block are compressed: all, attn (q, k, v, o) or mlp (gate, up, "
                             "down); the others stay dense, and --ratio is of the compressed ones.")
CalibOption = typer.Option(None, "--calib", help="Calibration: 'mix' (default: equal shares of the bundled prose, technical and code texts), "
                           "comma-separated bundled names (e.g. 'prose': Pride and Prejudice alone) or a text file/folder.")


def parse_positive_ints(text: str, option: str) -> tuple[int, ...]:
    """'16,64' -> (16, 64); anything else is the user's mistake, named with its option."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UserError(f"{option} must be comma-separated positive integers, got '{text}'")
    return values


def _invocation(subcommand: str) -> str:
    """The command as typed, shell-quoted (an empty option value stays visible), for a report's "Measured by"."""
    return shlex.join(["sslc-export", subcommand, *sys.argv[2:]])


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*map(str, row))
    out.print(table)


@app.command()
@handles_user_errors
def compress(
    context: typer.Context,
    out_dir: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to create."),
    model: Optional[str] = ModelOption,
    method: str = typer.Option("sslc", help="sslc | wanda | sparsegpt | magnitude | svd | losparse (structured S, trained with its cubic "
                               "pruning schedule) | hss (S plus a hierarchical low-rank residual after an RCM reordering)."),
    ratio: float = typer.Option(defaults.RATIO, help="Fraction of each compressed layer's parameters removed (0 < c < 1); U, V count inside."),
    rank_ratio: float = typer.Option(defaults.RANK_RATIO, help="sslc, losparse: share of the kept budget spent on the low-rank pair (why this default: docs/results.md)."),
    iters: Optional[int] = typer.Option(None, help=f"sslc: maximum alternating iterations (default: {defaults.SSLC_ITERS_TEXT}); "
                                        f"losparse: training steps (default: {defaults.LOSPARSE_STEPS['exact']})."),
    preset: Optional[str] = typer.Option(None, help="sslc: paper = the published algorithm (--loss diag, SVD step first, --rank-ratio "
                                         "0.25, 40 iterations) instead of our defaults; --loss, --rank-ratio, --iters given still win."),
    salient: float = typer.Option(defaults.SALIENT_FRACTION, help="sslc: fraction of weights (largest |W·D|) always kept in S."),
    refit_rounds: Optional[int] = typer.Option(None, "--refit-rounds", help=f"sslc --loss exact: after the alternation, rounds of S's values "
                                               f"re-solved on its mask (the OBS sweep sets each once, greedily) and L refitted to them "
                                               f"(default {defaults.REFIT_ROUNDS}; 0 = off, as in --preset paper)."),
    loss: Optional[str] = typer.Option(None, help="exact (default for sslc, svd): whitened SVD + OBS pruning on XᵀX; diag: activation-scaled, as in the paper."),
    tol: float = typer.Option(defaults.TOL, help="sslc: stop when an iteration improves the loss by less than this fraction."),
    bits: int = typer.Option(defaults.BITS, help="32 (fp32) | 8 | 4: S, U and V quantized inside the decomposition (sslc --loss exact, sparsegpt; S in the OBS sweep; magnitude rounds to nearest); with --ratio 0, a GPTQ-quantized dense model (magnitude: round-to-nearest)."),
    group_size: int = typer.Option(defaults.GROUP_SIZE, "--group-size", help="With --bits: input columns per scale (a positive multiple of 16)."),
    scales: str = typer.Option(defaults.SCALES, help="With --bits: each group's scale, mse (the shrink of max |w| / qmax that "
                               "rounds the group with the least error, priced by the OBS sweep where there is one) or max "
                               "(max |w| / qmax)."),
    damp: float = typer.Option(defaults.DAMP, help="Exact loss (sslc, svd, sparsegpt): damping added to XᵀX, as a fraction of its mean diagonal; (0, 1]."),
    pattern: Optional[str] = typer.Option(None, help="Sparsity of S: unstructured | nm | structured; default: the method's first "
                                          "(structured for losparse, unstructured for the others)."),
    nm: str = typer.Option("2:4", help="N:M for --pattern nm."),
    scope: str = typer.Option("row", help="unstructured: budget per output row (row) or per matrix (layer)."),
    axis: str = typer.Option("columns", help="structured: keep whole input columns or output rows of S."),
    calib: Optional[str] = CalibOption,
    nsamples: int = typer.Option(defaults.NSAMPLES, help="Calibration sequences."),
    seqlen: int = typer.Option(defaults.SEQLEN, help="Tokens per calibration sequence."),
    seed: int = typer.Option(defaults.SEED, help="Seed for calibration sampling and randomized SVD."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished block."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder (only once the new one is complete)."),
    streaming: bool = typer.Option(False, "--streaming", help="Hold one decoder block in memory at a time (safetensors model folders)."),
    device: str = typer.Option(defaults.DEVICE, help="Run calibration and decompositions on cpu or cuda[:N] (one block on the GPU at a time)."),
    allocation: str = typer.Option(defaults.ALLOCATION, help="uniform: every layer at --ratio; global: the same total split over layers by "
                                   "their measured loss curves, each weighted by what its output error costs the model (a first "
                                   "pass and one backward pass over the dense model; not with --streaming), within --min-keep/--max-keep."),
    min_keep: float = typer.Option(defaults.MIN_KEEP, "--min-keep", help="--allocation global: least fraction of a layer's parameters kept."),
    max_keep: float = typer.Option(defaults.MAX_KEEP, "--max-keep", help="--allocation global: largest fraction of a layer's parameters kept."),
    targets: str = TargetsOption,
    threads: Optional[int] = ThreadsOption,
    json_path: Optional[Path] = JsonOption,
):
    """Compress the decoder Linears (every one, or those --targets names) to W ≈ U·V + S and write a checkpoint folder."""
    from sslc_export.allocation import Allocation
    from sslc_export.compress import CompressJob, compress as run_compress
    from sslc_export.methods import Settings, get_method
    from sslc_export.patterns import Pattern
    from sslc_export.report import write_json

    set_threads(threads)
    if preset is not None and method != "sslc":
        raise UserError(f"--preset {preset} is a set of sslc settings: use it with --method sslc")
    unset = preset is not None and context.get_parameter_source("rank_ratio").name == "DEFAULT"  # left to the preset
    job = CompressJob(
        out=out_dir,
        method=method,
        ratio=ratio,
        model=model,
        pattern=Pattern.parse(pattern or get_method(method).patterns[0], nm, scope, axis),
        settings=Settings.from_flags(preset, rank_ratio=None if unset else rank_ratio, iters=iters, salient_fraction=salient,
                                     refit_rounds=refit_rounds, loss=loss, tol=tol, damp=damp, seed=seed, bits=bits, group_size=group_size,
                                     scales=scales),
        calib=calib,
        nsamples=nsamples,
        seqlen=seqlen,
        resume=resume,
        overwrite=overwrite,
        streaming=streaming,
        device=device,
        allocation=Allocation(allocation, min_keep, max_keep),
        targets=targets,
    )
    if not is_main_process():  # under torchrun / accelerate launch: rank 0 alone shows progress and the summary
        run_compress(job)
        return
    with progress_bar() as bar:
        task = bar.add_task("compressing", total=None)

        def advance(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        try:
            manifest = run_compress(job, advance).manifest
        except KeyboardInterrupt:
            console.print(f"interrupted: progress kept, rerun with --resume to continue")
            raise typer.Exit(130) from None
    print_compress_summary(manifest)
    write_json(json_path, {key: value for key, value in manifest.items() if key != "files"})
    out.print(f"checkpoint written to {out_dir}")


def print_compress_summary(manifest: dict) -> None:
    table = Table(title=f"{manifest['method']} at ratio {manifest['ratio']} ({manifest['compression_seconds']} s)")
    for column in ("layer", "shape", "ratio", "rank", "nnz", "kept", "rel. loss", "iters"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    for layer in manifest["layers"]:
        table.add_row(
            layer["name"],
            "x".join(map(str, layer["shape"])),
            f"{layer['ratio']:.3f}" if "ratio" in layer else "",
            str(layer["rank"]),
            str(layer["nnz"]),
            f"{layer['params_kept'] / layer['params_total']:.1%}",
            f"{layer['relative_loss']:.4f}",
            str(layer["iterations"]),
        )
    out.print(table)
    losses = [layer["relative_loss"] for layer in manifest["layers"]]
    out.print(
        f"kept {manifest['params_kept']:,} of {manifest['params_total']:,} compressed-layer parameters "
        f"({manifest['params_kept'] / manifest['params_total']:.1%}); mean relative loss {sum(losses) / len(losses):.4f}; "
        f"checkpoint {manifest['bytes']['total'] / 1e6:.1f} MB; peak RSS {manifest['peak_rss_bytes'] / 1e6:.0f} MB"
        f"{' (streaming)' if manifest['streaming'] else ''}; {manifest['threads']} threads on {manifest.get('device', 'cpu')}"
        + (f", {manifest['peak_device_bytes'] / 1e6:.0f} MB peak GPU memory" if manifest.get("peak_device_bytes") else "")
    )


@app.command("finetune")
@handles_user_errors
def finetune_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder written by `sslc-export compress` (fp32 or --bits)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="New checkpoint folder to create (same format and size as the parent)."),
    loss: Optional[str] = typer.Option(None, help="distill: KL divergence to the dense model's next-token distribution "
                                       "(loads it too); lm: cross-entropy on the text's next tokens. Default: lm for an fp32 "
                                       "checkpoint, distill for a --bits one (why: docs/results.md)."),
    steps: int = typer.Option(defaults.FINETUNE_STEPS, help="Optimizer steps (Adam); each sees --batch-size new windows of the text."),
    lr: float = typer.Option(defaults.FINETUNE_LR, help="Adam's learning rate for fp32 U and V, reached after a warm-up over the "
                             "first eighth of the steps, then decayed linearly to 0."),
    grid_lr: float = typer.Option(defaults.FINETUNE_GRID_LR, "--grid-lr", help="--bits checkpoints: U and V's learning rate in "
                                  "grid steps (same schedule)."),
    scale_lr: float = typer.Option(defaults.FINETUNE_SCALE_LR, "--scale-lr", help="--bits checkpoints: the learning rate of their "
                                   "per-group scales, as a relative change per step (same schedule)."),
    sparse_scales: Optional[bool] = typer.Option(None, "--sparse-scales/--no-sparse-scales", help="--bits checkpoints: train "
                                                 "S's per-group scales too, at --scale-lr (its integers and mask stay frozen, no "
                                                 "parameter is added; on by default there; why: docs/results.md)."),
    seqlen: int = typer.Option(defaults.FINETUNE_SEQLEN, help="Tokens per training window."),
    batch_size: int = typer.Option(defaults.FINETUNE_BATCH, "--batch-size", help="Windows per step; time per step grows with seqlen x batch."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Training text: as compress's --calib; default: the checkpoint's own calibration choice."),
    teacher: Optional[str] = typer.Option(None, help="--loss distill: the dense model (default: the checkpoint's source model; its hash must match)."),
    seed: int = typer.Option(defaults.SEED, help="Seed for the training windows and their order."),
    save_every: int = typer.Option(defaults.FINETUNE_SAVE_EVERY, help="Steps between the points --resume continues from."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last saved step (same flags); "
                                "it ends with the same tensors as an uninterrupted run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder (only once the new one is complete)."),
    threads: Optional[int] = ThreadsOption,
    json_path: Optional[Path] = JsonOption,
):
    """Recover quality after compression: train each compressed Linear's U and V with S, its mask, biases,
    embeddings, norms and head frozen, and write a new checkpoint that records its parent's hash and the settings.

    No parameter is added: the new checkpoint has the parent's shape and size and exports the same way. A
    quantized checkpoint (compress --bits) is trained on its grid: U and V in grid units, rounded in every forward
    pass (straight-through estimator), with their per-group scales trained too, and stored as integers and scales.

    Example: `finetune runs/sslc-0.5 --out runs/sslc-0.5-ft`, then `eval runs/sslc-0.5 runs/sslc-0.5-ft`."""
    from sslc_export.finetune import FinetuneJob, finetune
    from sslc_export.report import write_json

    set_threads(threads)
    job = FinetuneJob(checkpoint=checkpoint, out=out_dir, loss=loss, steps=steps, lr=lr, grid_lr=grid_lr,
                      scale_lr=scale_lr, sparse_scales=sparse_scales, seqlen=seqlen, batch_size=batch_size,
                      calib=calib, teacher=teacher, seed=seed, save_every=save_every, resume=resume, overwrite=overwrite)
    with progress_bar() as bar:
        task = bar.add_task("loading", total=None)

        def advance(done: int, total: int, value: float) -> None:
            bar.update(task, completed=done, total=total, description=f"loss {value:.4f}")

        try:
            manifest = finetune(job, advance)
        except KeyboardInterrupt:
            console.print(f"interrupted: progress kept every {save_every} steps, rerun with --resume to continue")
            raise typer.Exit(130) from None
    record = manifest["finetune"]
    out.print(f"{record['settings']['loss']} loss {record['losses'][0]:.4f} -> {record['losses'][-1]:.4f} over {steps} steps in {record['seconds']} s "
              f"({manifest['threads']} threads); checkpoint written to {out_dir}")
    write_json(json_path, {key: value for key, value in manifest.items() if key not in ("files", "layers")})


@app.command("convert")
@handles_user_errors
def convert_command(
    out_dir: Path = typer.Argument(..., help="Hugging Face folder to create (safetensors, config, tokenizer)."),
    model: Optional[str] = ModelOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder (only once the new one is complete)."),
):
    """Write a model (e.g. a GGUF file, dequantized to float32) as a safetensors folder, which
    `compress --streaming` can read one block at a time."""
    from sslc_export.models.loading import save_model_folder

    with console.status("converting"):
        save_model_folder(model, out_dir, overwrite)
    out.print(f"model written to {out_dir}")


@app.command("eval")
@handles_user_errors
def evaluate_command(
    model_or_checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint folder, HF model folder or .gguf; default: bundled model."),
    heldout: Optional[str] = HeldoutOption,
    window: int = typer.Option(defaults.WINDOW, help="Tokens per perplexity window."),
    stride: Optional[int] = typer.Option(None, help="Tokens between window starts (default: = window, no overlap)."),
    prompt: str = typer.Option("The capital of France is", help="Prompt for a greedy generation."),
    max_new_tokens: int = typer.Option(24, help="Tokens to generate (0 skips generation)."),
    threads: Optional[int] = ThreadsOption,
    json_path: Optional[Path] = JsonOption,
):
    """Perplexity on each held-out text and a greedy generation, for the dense model or a checkpoint."""
    from sslc_export.corpus import heldout_texts, read_heldout
    from sslc_export.evaluate import greedy_generate, perplexity_per_text
    from sslc_export.checkpoint import load_model_or_checkpoint
    from sslc_export.report import write_json

    set_threads(threads)
    texts = read_heldout(heldout)
    loaded = load_model_or_checkpoint(model_or_checkpoint)
    with progress_bar() as bar:
        task = bar.add_task("perplexity", total=None)
        per_text = perplexity_per_text(
            loaded.model, loaded.tokenizer, texts, window, stride,
            lambda name, done, total: bar.update(task, completed=done, total=total, description=f"perplexity {name}"),
        )
    paths = {text.name: str(text.path) for text in heldout_texts(heldout)}
    result = {"model": loaded.identity["source"], "window": window, "stride": stride or window,
              "heldout": {name: {"path": paths[name], "perplexity": value["perplexity"], "tokens": value["tokens"]}
                          for name, value in per_text.items()}}
    if max_new_tokens > 0:
        result.update(prompt=prompt, generation=greedy_generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens))
    table = Table(title=f"evaluation of {result['model']} (window {window}, stride {stride or window})")
    for column in ("held-out text", "file", "tokens", "perplexity"):
        table.add_column(column)
    for name, value in result["heldout"].items():
        table.add_row(name, Path(value["path"]).name, str(value["tokens"]), f"{value['perplexity']:.3f}")
    out.print(table)
    if max_new_tokens > 0:
        out.print(f"{prompt!r} -> {result['generation']!r}", highlight=False, markup=False)
    write_json(json_path, result)


@app.command("export")
@handles_user_errors
def export_command(
    source: Optional[str] = typer.Argument(None, help="Checkpoint folder (or, with --dense, a model; default: bundled)."),
    out_dir: Optional[Path] = typer.Argument(None, help="ONNX folder to create."),
    fmt: str = typer.Option("dense", "--format", "-f", help="LAYOUT or LAYOUT-int8/-int4. " + format_help_text()),
    lm_head: str = typer.Option("fp32", "--lm-head", help="lm_head and token embedding: fp32 | int8 | int4 (MatMulNBits and GatherBlockQuantized, block 32); use the same choice for every model you compare."),
    graph: str = typer.Option("fused", "--graph", help="fused: attention, rotary and RMSNorm as onnxruntime's contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization), as onnxruntime-genai's builder does; optimum: optimum's graph unchanged (for providers without those ops, e.g. TensorRT; nm is never fused)."),
    dense: bool = typer.Option(False, "--dense", help="Export an uncompressed model as the baseline (SOURCE is a model)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder (only once the new one is complete)."),
    json_path: Optional[Path] = JsonOption,
):
    """Export to ONNX (task text-generation-with-past): optimum's dense export, then each
    compressed MatMul rewritten as y = x·Sᵀ + (x·Vᵀ)·Uᵀ in the chosen format.

    Examples: `export runs/sslc-0.5 onnx/sslc-0.5`; `export --dense onnx/dense` (bundled model);
    `export --dense path/to/model onnx/dense`."""
    from sslc_export.onnx.build import export_checkpoint_dir, export_dense_model
    from sslc_export.report import write_json

    if out_dir is None:
        if not dense or source is None:
            raise UserError("missing OUT_DIR: `sslc-export export CHECKPOINT OUT_DIR` or `sslc-export export --dense [MODEL] OUT_DIR`")
        source, out_dir = None, Path(source)
    with console.status("exporting to ONNX"):
        if dense:
            record = export_dense_model(source, out_dir, fmt, overwrite, lm_head, graph)
        else:
            record = export_checkpoint_dir(Path(source), out_dir, fmt, overwrite, lm_head, graph)
    out.print(f"{record['format']} ONNX written to {out_dir}: {record['onnx_bytes'] / 1e6:.1f} MB, "
              f"{record['compressed_layers']} rewritten layers, {record['export_seconds']} s")
    write_json(json_path, {k: v for k, v in record.items() if k != "files"})


@app.command("validate")
@handles_user_errors
def validate_command(
    onnx_dir: Path = typer.Argument(..., help="Folder written by `sslc-export export`."),
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint (or model, for a dense export) it came from; default: bundled model."),
    decode_steps: int = typer.Option(8, help="Greedy decode steps compared after each prompt's prefill."),
    rtol: Optional[float] = typer.Option(None, help="Tolerance on max |Δlogit| / max |logit| over every position (default: what export.json records: 1e-5 for fp32 formats and for sparse-int8/-int4 against their own dequantized factors; sanity bounds 1.5e-1 and 8e-1 for MatMulNBits int8/int4)."),
    json_path: Optional[Path] = JsonOption,
):
    """Compare ONNX logits with the PyTorch model on fixed prompts (prefill and decode);
    exit 1 past tolerance or, for fp32 formats, on any greedy-token disagreement."""
    from sslc_export.atomic import verify_inventory
    from sslc_export.checkpoint import load_model_or_checkpoint
    from sslc_export.onnx.build import EXPORT_MANIFEST
    from sslc_export.onnx.formats.base import FP32_RTOL
    from sslc_export.onnx.validate import default_rtol, exact_reference, validate
    from sslc_export.report import write_json

    record_path = onnx_dir / EXPORT_MANIFEST
    if not record_path.is_file():
        raise UserError(f"{onnx_dir} has no {EXPORT_MANIFEST}: pass a complete folder written by `sslc-export export`")
    import json

    record = json.loads(record_path.read_text())
    verify_inventory(onnx_dir, record["files"])
    reference = load_model_or_checkpoint(checkpoint)
    if checkpoint is not None:
        reference = exact_reference(record, Path(checkpoint), reference)
    bound = default_rtol(record)
    with console.status("validating"):
        report = validate(onnx_dir, reference, decode_steps, rtol or bound, require_same_tokens=bound <= FP32_RTOL)
    print_table(f"ONNX vs PyTorch ({report.steps} steps)", ["max abs error", "max rel error", "at", "greedy agreement", "result"],
                [[f"{report.max_abs_error:.2e}", f"{report.max_relative_error:.2e}", report.worst_at, f"{report.greedy_agreement:.0%}",
                  "[green]pass[/]" if report.passed else "[red]FAIL[/]"]])
    write_json(json_path, report.as_dict())
    if not report.passed:
        raise typer.Exit(1)


@app.command("sizes")
@handles_user_errors
def sizes_command(
    onnx_dirs: list[Path] = typer.Argument(..., help="Folders written by `sslc-export export`; the first is the baseline."),
    report: Optional[Path] = typer.Option(None, help="Markdown file whose 'onnx-sizes' section (or --section) gets the table."),
    section: str = typer.Option("onnx-sizes", help="Section of --report to replace."),
    json_path: Optional[Path] = JsonOption,
):
    """Tabulate the on-disk size of exported ONNX folders against the first one."""
    import json

    from sslc_export.onnx.build import EXPORT_MANIFEST
    from sslc_export.report import markdown_table, update_markdown_section, write_json

    records = []
    for folder in onnx_dirs:
        path = folder / EXPORT_MANIFEST
        if not path.is_file():
            raise UserError(f"{folder} has no {EXPORT_MANIFEST}: pass folders written by `sslc-export export`")
        record = json.loads(path.read_text())
        source = record["source"]
        records.append({
            "folder": folder.name,
            "format": record["format"],
            "model": f"{source['method']} r{source['ratio']} ({source['pattern']['kind']})" if "method" in source else "dense",
            "onnx_bytes": record["onnx_bytes"],
        })
    base = records[0]["onnx_bytes"]
    headers = ["folder", "model", "format", "ONNX MB", "vs first"]
    rows = [[r["folder"], r["model"], r["format"], f"{r['onnx_bytes'] / 1e6:.1f}", f"{r['onnx_bytes'] / base:.2f}x"] for r in records]
    print_table("ONNX file sizes", headers, rows)
    if report is not None:
        body = f"Measured by `sslc-export sizes {' '.join(str(d) for d in onnx_dirs)}` (model.onnx plus external data).\n\n"
        update_markdown_section(report, section, body + markdown_table(headers, rows))
    write_json(json_path, {"rows": records})


@app.command("checkpoints")
@handles_user_errors
def checkpoints_command(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint folders written by `sslc-export compress`."),
    report: Optional[Path] = typer.Option(None, help="Markdown file that gets the table in the section named by --section."),
    section: str = typer.Option("checkpoints", help="Section of --report to replace."),
    layers: bool = typer.Option(False, "--layers", help="Also tabulate each checkpoint's per-layer ratio (fraction of the "
                                "layer removed; --allocation global varies it), one row per block."),
    json_path: Optional[Path] = JsonOption,
):
    """Tabulate how checkpoints were made: method, ratio, device, wall time (and the part spent in
    the methods' decompositions), peak memory, size.

    The figures come from each checkpoint's manifest, recorded by the run that wrote it."""
    from sslc_export.checkpoint import read_manifest
    from sslc_export.report import markdown_table, update_markdown_section, write_json

    manifests = [read_manifest(folder) for folder in checkpoints]
    headers = ["checkpoint", "model", "method", "ratio", "streaming", "device", "threads", "compress s", "decompose s",
               "peak RSS MB", "memory cap MB", "checkpoint MB"]

    def megabytes(value: int | None, missing: str) -> str:
        return missing if value is None else f"{value / 1e6:.0f}"

    def cap(manifest: dict) -> int | None:
        limits = manifest.get("memory_limits") or {}
        return min(limits.values()) if limits else None

    rows = [
        [folder.name, Path(m["source_model"]["source"]).name, m["method"], m["ratio"], "yes" if m.get("streaming") else "no",
         m.get("device", "cpu"), m["threads"], m["compression_seconds"], f"{sum(layer['seconds'] for layer in m['layers']):.1f}",
         megabytes(m.get("peak_rss_bytes"), "not recorded"),
         megabytes(cap(m), "none"), f"{m['bytes']['total'] / 1e6:.1f}"]
        for folder, m in zip(checkpoints, manifests)
    ]
    print_table("checkpoints", headers, rows)
    body = (f"Measured by the runs that wrote each checkpoint (peak RSS of the whole process, from its manifest); "
            f"tabulated by `sslc-export checkpoints {' '.join(str(c) for c in checkpoints)}{' --layers' if layers else ''}`.\n\n"
            + markdown_table(headers, rows))
    if layers:
        from sslc_export.allocation import ratio_table

        for folder, manifest in zip(checkpoints, manifests):
            layer_headers, layer_rows = ratio_table(manifest["layers"])
            title = f"{folder.name}: ratio per layer"
            print_table(title, layer_headers, layer_rows)
            body += f"\n{title}\n\n" + markdown_table(layer_headers, layer_rows)
    if report is not None:
        update_markdown_section(report, section, body)
    summaries = [{k: v for k, v in m.items() if k not in ("layers", "files")} for m in manifests]
    write_json(json_path, {"rows": [{"folder": str(f), **summary} for f, summary in zip(checkpoints, summaries)]})


@app.command("providers")
@handles_user_errors
def providers_command():
    """List the onnxruntime execution providers and whether each can run here (and why not)."""
    from sslc_export.runtimes.providers import PROVIDERS

    states = {name: provider.availability() for name, provider in PROVIDERS.items()}
    print_table("execution providers", ["provider", "available", "why"],
                [[name, "[green]yes[/]" if state.available else "[red]no[/]", state.reason] for name, state in states.items()])


@app.command("run")
@handles_user_errors
def run_command(
    onnx_dir: Path = typer.Argument(..., help="Folder written by `sslc-export export`."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    provider: str = typer.Option("cpu", help="Execution provider (see `sslc-export providers`)."),
    max_new_tokens: int = typer.Option(64, help="Stop after this many tokens (or at the end token)."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template as a user turn."),
    threads: Optional[int] = ThreadsOption,
):
    """Generate text with onnxruntime, streaming tokens as they come."""
    from transformers import AutoConfig, AutoTokenizer

    from sslc_export.models.loading import fix_end_token
    from sslc_export.runtimes.generate import generate
    from sslc_export.runtimes.session import OnnxCausalLM

    runtime = OnnxCausalLM(onnx_dir, provider, threads)
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    fix_end_token(tokenizer, AutoConfig.from_pretrained(onnx_dir))
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    for _, piece in generate(runtime, tokenizer, prompt, max_new_tokens, temperature, top_p, seed):
        out.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
    out.print()


@app.command("bench")
@handles_user_errors
def bench_command(
    onnx_dirs: list[Path] = typer.Argument(..., help="Folders written by `sslc-export export`; the first is the baseline for ratios."),
    provider: str = typer.Option("cpu", help="Comma-separated execution providers, all measured in this one run."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads (default: all cores)."),
    heldout: Optional[str] = typer.Option(None, "--heldout", "--text", help=HELDOUT_HELP + " Timing takes its ids from the first; perplexity is measured on each through the same session."),
    no_perplexity: bool = typer.Option(False, "--no-perplexity", help="Skip perplexity (timing only)."),
    genai: bool = typer.Option(False, "--genai", help="Also decode through onnxruntime-genai (CPU) and report its speed and whether it picks our greedy tokens."),
    prompt_lengths: str = typer.Option(",".join(map(str, defaults.BENCH_PROMPT_LENGTHS)), help="Prompt lengths for prefill timing."),
    decode_tokens: int = typer.Option(defaults.BENCH_DECODE_TOKENS, help="New tokens per decode run (batch 1)."),
    repeats: int = typer.Option(defaults.BENCH_REPEATS, help="Timed repeats after warm-up."),
    rounds: int = typer.Option(1, help="Passes over all folders, one after another; each folder's timings are pooled over them, so a slow spell of a noisy machine does not fall on one model only (perplexity: first pass)."),
    out_dir: Path = typer.Option(Path("runs/bench"), help="Where bench.json, bench.md and bench.png go."),
    report: Optional[Path] = typer.Option(None, help="Markdown file whose 'bench' section (or --section) gets the table (e.g. docs/results.md)."),
    section: str = typer.Option("bench", help="Section of --report to replace."),
):
    """Latency, throughput, memory, size and perplexity of ONNX models, side by side in one run.

    A folder that fails (after the first, the baseline) does not stop the run: the others are measured and
    written to --out-dir, the --report is left unchanged, and the command exits with an error naming it."""
    from sslc_export.runtimes.bench import BenchConfig, bench, columns, plot, table_rows
    from sslc_export.atomic import write_file_atomic
    from sslc_export.corpus import read_heldout
    from sslc_export.report import markdown_table, update_markdown_section, write_json

    lengths = parse_positive_ints(prompt_lengths, "--prompt-lengths")
    if decode_tokens < 1 or repeats < 1 or rounds < 1 or (threads is not None and threads < 1):
        raise UserError("--decode-tokens, --repeats, --rounds and --threads must be >= 1")
    config = BenchConfig(prompt_lengths=lengths, decode_tokens=decode_tokens, repeats=repeats, rounds=rounds, threads=threads,
                         texts=read_heldout(heldout), measure_perplexity=not no_perplexity, genai=genai)
    providers = [p for p in provider.split(",") if p]
    from sslc_export.runtimes.providers import get_provider

    for name in providers:
        state = get_provider(name).availability()
        if not state.available:
            raise UserError(f"provider {name} is not available: {state.reason}")
    with console.status(f"benchmarking {len(onnx_dirs)} model(s) on {', '.join(providers)}"):
        result = bench(onnx_dirs, providers, config)
    rows = table_rows(result)
    print_table(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['threads']} threads", columns(result), rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "bench.json", result)
    command = _invocation("bench")
    body = (f"Measured by `{command}` on {result['machine']['cpu']} ({result['machine']['cores']} cores, "
            f"{result['threads']} onnxruntime threads, onnxruntime {result['machine']['onnxruntime']}, "
            f"CPU flags {' '.join(result['machine']['cpu_flags']) or 'unknown'}, kernel path {result['machine']['kernel_isa'] or 'not built'}); "
            f"decode: {decode_tokens} new tokens after a {config.decode_prompt}-token prompt, batch 1; "
            f"speed-up = baseline decode p50 / this decode p50, same run.\n\n" + markdown_table(columns(result), rows))
    write_file_atomic(out_dir / "bench.md", lambda tmp: tmp.write_text(body))
    plot(result, out_dir / "bench.png")
    if result["failures"]:
        for failure in result["failures"]:
            console.print(f"[red]error:[/red] {failure['error']}")
        raise UserError(f"{len(result['failures'])} folder(s) failed; the others are in {out_dir}/bench.json, {report or 'no report'} left unchanged")
    if report is not None:
        update_markdown_section(report, section, body + f"\n![decode speed vs quality]({os.path.relpath(out_dir / 'bench.png', report.parent)})\n")
    out.print(f"wrote {out_dir}/bench.json, bench.md, bench.png")


@app.command("profile")
@handles_user_errors
def profile_command(
    onnx_dirs: list[Path] = typer.Argument(..., help="Folders written by `sslc-export export`."),
    steps: int = typer.Option(8, help="Decode steps traced (after an untraced prefill and one warm-up step)."),
    prompt_length: int = typer.Option(128, help="Tokens of held-out text before the traced decode steps."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads (default: all cores)."),
    top: int = typer.Option(12, help="Operator types shown per model (the rest are summed in one row)."),
    report: Optional[Path] = typer.Option(None, help="Markdown file whose 'profile' section (or --section) gets the tables."),
    section: str = typer.Option("profile", help="Section of --report to replace."),
    json_path: Optional[Path] = JsonOption,
):
    """Where a decode step's time goes: onnxruntime's per-node trace, summed per operator type, and the
    time outside every node (scheduling, allocations, copies)."""
    from transformers import AutoTokenizer

    from sslc_export.runtimes.profile import profile_decode
    from sslc_export.corpus import HELDOUT_TEXTS, read_text
    from sslc_export.report import markdown_table, update_markdown_section, write_json

    if steps < 1 or prompt_length < 1:
        raise UserError("--steps and --prompt-length must be >= 1")
    results, bodies = [], []
    for folder in onnx_dirs:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(read_text(HELDOUT_TEXTS["prose"]), return_tensors="np", add_special_tokens=False).input_ids[:, :prompt_length]
        with console.status(f"profiling {folder}"):
            result = profile_decode(folder, ids, steps, threads)
        results.append(result)
        shown, rest = result["ops"][:top], result["ops"][top:]
        rows = [[op["op"], op["nodes"], f"{op['ms']:.2f}", f"{op['share']:.0%}"] for op in shown]
        if rest:
            rows.append([f"{len(rest)} other types", sum(op["nodes"] for op in rest), f"{sum(op['ms'] for op in rest):.2f}",
                         f"{sum(op['share'] for op in rest):.0%}"])
        rows.append(["outside the nodes' kernels", "", f"{result['overhead_ms']:.2f}", f"{result['overhead_ms'] / result['step_ms']:.0%}"])
        title = f"{result['model']}: {result['step_ms']:.2f} ms per decode step (traced)"
        print_table(title, ["operator", "nodes", "ms/step", "share"], rows)
        bodies.append(f"**{title}**\n\n" + markdown_table(["operator", "nodes", "ms/step", "share"], rows))
    write_json(json_path, {"threads": threads, "rows": results})
    if report is not None:
        command = _invocation("profile")
        update_markdown_section(report, section, f"Measured by `{command}` (onnxruntime's profiler adds some time to every node).\n\n" + "\n".join(bodies))


@app.command("kernel-bench")
@handles_user_errors
def kernel_bench_command(
    threads: int = typer.Option(1, help="onnxruntime intra-op threads, the same for every op."),
    seconds: float = typer.Option(1.0, help="Timed seconds per op, shape and row count (median of the runs)."),
    rows: str = typer.Option("1,128", help="Comma-separated input row counts (1: decode's GEMV; 128: a prefill's "
                             "GEMM)."),
    report: Optional[Path] = typer.Option(None, help="Markdown file whose 'kernels' section (or --section) gets the "
                                          "table."),
    section: str = typer.Option("kernels", help="Section of --report to replace."),
    json_path: Optional[Path] = JsonOption,
):
    """Micro-benchmark of the ai.sslc operators vs onnxruntime's MatMul and MatMulNBits on SmolLM2's layer
    shapes and a Qwen-sized one: time, bytes read and GB/s per call, against this machine's copy bandwidth."""
    from sslc_export.runtimes import kernels
    from sslc_export.runtimes.kernelbench import run_kernel_bench

    if threads < 1 or seconds <= 0:
        raise UserError("--threads must be >= 1 and --seconds > 0")
    row_counts = parse_positive_ints(rows, "--rows")
    available, reason = kernels.availability()
    if not available:
        raise UserError(reason)
    result = run_kernel_bench(threads, seconds, rows=row_counts, report=report, section=section, json_path=json_path,
                              progress=console.print)
    print_table(f"ai.sslc kernels ({result['isa']}, {threads} thread(s)); copy bandwidth {result['copy_gb_per_s']} GB/s",
                ["N×K", "M", "op", "µs/call", "MB/call", "GB/s", "vs MatMul"],
                [[r["shape"], r["rows"], r["op"], r["us_per_call"], r["mb_per_call"], r["gb_per_s"], r["vs_matmul"]]
                 for r in result["rows"]])


@app.command("compare")
@handles_user_errors
def compare_command(
    methods: str = typer.Option("sslc,wanda,sparsegpt,magnitude,svd", help="Comma-separated methods."),
    ratios: str = typer.Option("0.3,0.5", help="Comma-separated compression ratios."),
    extra_losses: str = typer.Option("sslc:diag,svd:diag", help="Also run these method:loss pairs (each method also runs at its default loss)."),
    allocations: str = typer.Option(defaults.ALLOCATION, help="Comma-separated: run every variant with each of these "
                                    "--allocation modes (uniform, global; global at compress's default --min-keep/--max-keep)."),
    bits: str = typer.Option(str(defaults.BITS), help="Comma-separated: run every variant at each of these compress --bits (32, 8, "
                             "4; at the default --group-size). Ratio 0 runs only at 8 and 4 (a quantized dense model; "
                             "sslc: GPTQ): e.g. --ratios 0,0.3,0.5 --bits 32,4."),
    rtn: bool = typer.Option(False, "--rtn", help="Also round the dense model to nearest at each --bits below 32 (magnitude "
                             "at ratio 0, no error feedback; the grid's scale max|w|/7 per group of int4, where "
                             "onnxruntime's int4 takes max|w|/8 and its sign), labelled 'RTN intN'."),
    finetune: bool = typer.Option(False, "--finetune", help="After each variant with low-rank factors, also run `finetune` "
                                  "into <checkpoint>-ft (reused when finished from the same parent) and add its row; its "
                                  "minutes are compress + finetune."),
    finetune_steps: int = typer.Option(defaults.FINETUNE_STEPS, help="With --finetune: finetune's --steps (its other settings "
                                       "at finetune's defaults)."),
    model: Optional[str] = ModelOption,
    heldout: Optional[str] = HeldoutOption,
    window: int = typer.Option(defaults.WINDOW, help="Perplexity window (stride = window)."),
    work_dir: Path = typer.Option(Path("runs/compare"), help="Where checkpoints go; finished ones are reused."),
    rank_ratio: float = typer.Option(defaults.RANK_RATIO, help="sslc rank ratio."),
    iters: Optional[int] = typer.Option(None, help=f"sslc iterations (default: {defaults.SSLC_ITERS_TEXT})."),
    nsamples: int = typer.Option(defaults.NSAMPLES, help="Calibration sequences."),
    seqlen: int = typer.Option(defaults.SEQLEN, help="Tokens per calibration sequence."),
    calib: Optional[str] = CalibOption,
    targets: str = TargetsOption,
    report: Optional[Path] = typer.Option(None, help="Markdown file whose 'compression' section (or --section) gets the table (e.g. docs/results.md)."),
    section: str = typer.Option("compression", help="Section of --report to replace."),
    threads: Optional[int] = ThreadsOption,
    json_path: Optional[Path] = JsonOption,
):
    """Compress with several methods at equal budgets (at each --bits, optionally fine-tuned) and tabulate perplexity
    on each held-out text, checkpoint size and the minutes it took."""
    from sslc_export.corpus import read_heldout
    from sslc_export.compare import compare, parse_variants, variant_job
    from sslc_export.compress import CompressJob
    from sslc_export.finetune import FinetuneJob, check_job
    from sslc_export.methods import Settings
    from sslc_export.report import markdown_table, update_markdown_section, write_json

    set_threads(threads)
    variants = parse_variants(methods, ratios, extra_losses, allocations, bits, rtn)
    texts = read_heldout(heldout)
    base = CompressJob(
        out=work_dir, model=model, settings=Settings(rank_ratio=rank_ratio, iters=iters), calib=calib, nsamples=nsamples, seqlen=seqlen,
        targets=targets,
    )
    for variant in variants:  # every variant's flags checked before any work
        variant_job(variant, base, work_dir)
    # compare fills in each variant's checkpoint and out; these placeholders only let check_job see the settings
    tune = FinetuneJob(checkpoint=work_dir / "parent", out=work_dir / "parent-ft", steps=finetune_steps) if finetune else None
    if tune is not None:
        check_job(tune)
    with progress_bar() as bar:
        task = bar.add_task("dense", total=len(variants) * (2 if finetune else 1) + 1)  # fine-tuning skips rank-0 checkpoints
        rows = compare(variants, base, work_dir, texts, window, lambda label: bar.update(task, advance=1, description=label), tune)
        bar.update(task, completed=len(variants) * (2 if finetune else 1) + 1, description="done")
    headers = ["method", "loss", "ratio", "bits", "kept", *(f"ppl {name}" for name in texts), "worst vs dense", "mean rel. loss", "MB",
               "minutes"]
    table_rows = [
        [
            row["name"],
            row["loss"],
            row["ratio"],
            row["bits"],
            f"{row['params_kept'] / row['params_total']:.1%}" if "params_kept" in row else "100%",
            *(f"{row['perplexity'][name]:.2f}" for name in texts),
            f"{max(row.get('perplexity_vs_dense', {'dense': 1.0}).values()):.2f}x",
            f"{row['mean_relative_loss']:.4f}" if "mean_relative_loss" in row else "",
            f"{row['bytes'] / 1e6:.1f}",
            f"{(row['compression_seconds'] + row.get('finetune_seconds', 0)) / 60:.2f}" if "compression_seconds" in row else "",
        ]
        for row in rows
    ]
    print_table(f"held-out perplexity ({', '.join(texts)}; window {window})", headers, table_rows)
    import torch

    command = _invocation("compare")
    body = (
        f"Measured by `{command}` on this machine ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); "
        f"held-out texts {', '.join(f'`{name}`' for name in texts)}, window {window}, stride {window}; calibration {nsamples} x {seqlen} tokens "
        f"of `{calib or 'mix'}`; sslc rank ratio {rank_ratio}, at most {iters or defaults.SSLC_ITERS_TEXT} iterations"
        + (f"; fine-tuned rows: `finetune` at {finetune_steps} steps, its other settings at their defaults" if finetune else "")
        + ". MB: the checkpoint's files (dense: its fp32 parameters); minutes: compress (+ finetune) as the manifests record "
        "them (reused checkpoints keep their first run's times).\n\n"
        + markdown_table(headers, table_rows)
    )
    if report is not None:
        update_markdown_section(report, section, body)
    write_json(json_path, {"heldout": list(texts), "calibration": calib or "mix", "window": window, "rows": rows})


def main() -> None:
    # No model hub at run time, and no library chatter between our own progress bars.
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    app()


if __name__ == "__main__":
    sys.exit(main())
