"""The GPU paths in one prepared run (`make gpu-check`), for a machine with a CUDA build of torch
and no package registry: compress a random LLaMA of SmolLM2-135M's shape with --device cuda and on
the CPU, compare the two checkpoints' quality and times; compress it again on the GPU under
`torchrun --nproc-per-node 1` (the distributed path: nccl, cuda:LOCAL_RANK, results exchanged) and
compare that with the plain GPU run; and, when onnxruntime-gpu is importable, run the CUDA
checkpoint's ONNX export on onnxruntime's CUDA provider beside its CPU provider.

    python -m sslc_export.runtimes.gpu_check [--work-dir runs/gpu-check] [--tiny] [--device cuda]

Exit 1 with one line when there is no CUDA device, or when the checkpoints disagree or the torchrun run fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer

from sslc_export.models.synthetic import TINY_DIMS, build_random_model
from sslc_export import defaults
from sslc_export.corpus import HELDOUT_TEXTS, read_text
from sslc_export.distributed import free_port

CLI = Path(__file__).resolve().parents[1] / "cli.py"

SMOLLM2_DIMS = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048)
HELDOUT_CHARS = 20_000  # a slice of the prose held-out text: enough windows to compare, seconds on a CPU
# GPU and CPU sum in different orders, so the decompositions drift apart a little; a bug (wrong device,
# dropped factor) moves these figures by far more.
LOSS_TOLERANCE = 0.05  # relative difference of the mean relative layer loss
PERPLEXITY_TOLERANCE = 0.02  # relative difference of held-out perplexity


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the GPU paths, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def compress_on(model_dir: Path, out: Path, device: str) -> dict:
    """Compress with the default method and ratio on one device; the manifest plus the held-out perplexity."""
    from sslc_export.compress import CompressJob, compress

    return scored(out, compress(CompressJob(out=out, model=str(model_dir), device=device, overwrite=True)).manifest)


def compress_under_torchrun(model_dir: Path, out: Path, device: str) -> dict:
    """The same compression as one rank of `torchrun --nproc-per-node 1` (torch.distributed set up: nccl on cuda,
    gloo on the CPU); one line naming the failure when it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(CLI), "compress", "--model", str(model_dir), "--out", str(out),
               "--device", "cuda" if device.startswith("cuda") else device, "--overwrite"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.startswith("error:")] or run.stderr.splitlines()[-1:]
        raise RuntimeError(f"torchrun --nproc-per-node 1 exited {run.returncode}: {' '.join(lines)}")
    return scored(out, json.loads((out / "manifest.json").read_text()))


def scored(out: Path, manifest: dict) -> dict:
    """A checkpoint's times, mean relative layer loss and held-out perplexity, and where it ran."""
    from sslc_export.checkpoint import load_model_or_checkpoint
    from sslc_export.evaluate import perplexity_per_text

    loaded = load_model_or_checkpoint(str(out))
    text = {"prose": read_text(HELDOUT_TEXTS["prose"])[:HELDOUT_CHARS]}
    window = min(defaults.WINDOW, loaded.model.config.max_position_embeddings)
    perplexity = perplexity_per_text(loaded.model, loaded.tokenizer, text, window)["prose"]["perplexity"]
    losses = [layer["relative_loss"] for layer in manifest["layers"]]
    distributed = manifest["distributed"]
    return {"device": manifest["device"], "seconds": manifest["compression_seconds"], "mean_relative_loss": sum(losses) / len(losses),
            "perplexity": perplexity, "backend": distributed["backend"], "ranks": distributed["ranks"], "files": manifest["files"]}


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def onnx_cuda_line(checkpoint: Path, work_dir: Path) -> str:
    """Perplexity and decode speed of the checkpoint's ONNX export on the CUDA and CPU providers, or why not."""
    from sslc_export.runtimes.bench import BenchConfig, bench_model, summarize
    from sslc_export.runtimes.providers import get_provider
    from sslc_export.onnx.build import export_checkpoint_dir

    state = get_provider("cuda").availability()
    if not state.available:
        return f"onnx cuda provider: skipped ({state.reason})"
    folder = work_dir / "onnx-dense"
    export_checkpoint_dir(checkpoint, folder, "dense", True, "fp32", "fused")
    config = BenchConfig(prompt_lengths=(32,), decode_tokens=16, repeats=1, warmup=1,
                         texts={"prose": read_text(HELDOUT_TEXTS["prose"])[:HELDOUT_CHARS]})
    results = {provider: summarize(bench_model(folder, provider, config)) for provider in ("cuda", "cpu")}
    return "onnx " + "; ".join(f"{provider} provider: perplexity {r['perplexity']['prose']:.3f}, decode "
                               f"{r['decode']['p50_ms']:.2f} ms/token" for provider, r in results.items())


def main(
    work_dir: Path = typer.Option(Path("runs/gpu-check"), help="Where the model, checkpoints and ONNX folder go."),
    tiny: bool = typer.Option(False, "--tiny", help="The tests' 2-layer model instead of SmolLM2's shape (seconds, for checking this script)."),
    device: str = typer.Option("cuda", help="The device compared with the CPU (cpu checks this script on a machine without a GPU)."),
) -> None:
    """Compress on DEVICE and on the CPU, print both times and whether the checkpoints agree."""
    if device.startswith("cuda") and (reason := no_cuda_reason()) is not None:
        print(f"gpu-check: no CUDA: {reason}")
        raise typer.Exit(1)
    started = time.perf_counter()
    model_dir = build_random_model(work_dir / "model", "llama", **(TINY_DIMS if tiny else SMOLLM2_DIMS))
    checkpoints = [work_dir / f"sslc-{index}-{name}" for index, name in enumerate((device, "cpu"))]
    runs = [compress_on(model_dir, folder, name) for folder, name in zip(checkpoints, (device, "cpu"))]
    for run in runs:
        print(f"compress on {run['device']}: {run['seconds']:.1f} s, mean relative layer loss {run['mean_relative_loss']:.4f}, "
              f"held-out perplexity {run['perplexity']:.3f}")
    loss_gap = relative_difference(runs[0]["mean_relative_loss"], runs[1]["mean_relative_loss"])
    perplexity_gap = relative_difference(runs[0]["perplexity"], runs[1]["perplexity"])
    agree = loss_gap <= LOSS_TOLERANCE and perplexity_gap <= PERPLEXITY_TOLERANCE
    print(f"{device} vs cpu: mean relative loss differs by {loss_gap:.2%} (tolerance {LOSS_TOLERANCE:.0%}), perplexity by "
          f"{perplexity_gap:.2%} (tolerance {PERPLEXITY_TOLERANCE:.0%}): {'agree' if agree else 'DISAGREE'}")
    agree = distributed_line(runs[0], model_dir, work_dir / f"sslc-torchrun-{device}", device) and agree
    print(onnx_cuda_line(checkpoints[0], work_dir))
    print(f"gpu-check: {'all agree' if agree else 'DISAGREEMENT above'}; {time.perf_counter() - started:.0f} s in all")
    if not agree:
        raise typer.Exit(1)


def distributed_line(plain: dict, model_dir: Path, out: Path, device: str) -> bool:
    """Print the torchrun run beside the plain one on the same device; whether they agree (same tolerances as
    against the CPU: on a GPU the two runs need not sum in the same order)."""
    try:
        run = compress_under_torchrun(model_dir, out, device)
    except RuntimeError as exc:
        print(f"torchrun, 1 process: FAILED: {exc}")
        return False
    rank = run["ranks"][0]
    memory = "" if rank["peak_device_bytes"] is None else f", peak device memory {rank['peak_device_bytes'] / 2**20:.0f} MiB"
    loss_gap = relative_difference(run["mean_relative_loss"], plain["mean_relative_loss"])
    perplexity_gap = relative_difference(run["perplexity"], plain["perplexity"])
    agree = loss_gap <= LOSS_TOLERANCE and perplexity_gap <= PERPLEXITY_TOLERANCE
    print(f"torchrun, 1 process ({run['backend']}) on {rank['device']}: {run['seconds']:.1f} s{memory}, mean relative layer loss "
          f"{run['mean_relative_loss']:.4f}, held-out perplexity {run['perplexity']:.3f}; tensors "
          f"{'identical to' if run['files'] == plain['files'] else 'differ from'} the plain {device} run's; "
          f"{'agree' if agree else 'DISAGREE'}")
    return agree


if __name__ == "__main__":
    typer.run(main)
