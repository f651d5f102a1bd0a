"""What compressing on several processes buys (`make results-distributed`): the same compression run with 1 and
with N processes, each checkpoint's manifest read for its times and each rank's peak memory, and, by arithmetic
from the 1-process run's per-layer times, an estimate for a 7B model on 8 ranks.

    python -m sslc_export.scaling CHECKPOINT_1 CHECKPOINT_N [--report docs/results.md] [--gpu-speedup S]

A checkpoint folder may have a sibling FOLDER.wall holding the whole command's wall seconds (/usr/bin/time -f %e).

The estimate (printed as one): every Linear of the 7B model takes the measured time of the same Linear of the
small model scaled by cost(m, n) = m·n² + n³ (per iteration of sslc --loss exact: the whitening and OBS sweeps are
m·n², the n×n factorisations n³), iterations as measured; a block's input groups run one after another, each
group's Linears shared out over the ranks as compress does (World.owners), so a group takes its slowest rank's
share; the walk (forward passes and statistics, on every rank) scales with the block's parameters at the same
calibration size. Exchanges between ranks, loading and writing are not modelled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sslc_export.models.architectures import architecture_for
from sslc_export.checkpoint import read_manifest
from sslc_export.distributed import World
from sslc_export.errors import UserError
from sslc_export.report import markdown_table, update_markdown_section

# Llama-2-7B's config: hidden 4096, MLP 11008, 32 heads of 128 with as many key/value heads, 32 blocks.
LLAMA_7B_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                   "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
LLAMA_7B_BLOCKS = 32
ESTIMATE_RANKS = 8
ESTIMATE_RANK_COUNTS = (1, 2, 3, 4, ESTIMATE_RANKS)
MIB = 2**20


def cost(shape: tuple[int, int]) -> float:
    rows, cols = shape
    return rows * cols**2 + cols**3


def short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def group_seconds(seconds: dict[str, float], shapes: dict[str, tuple[int, int]], ranks: int) -> float:
    """One block's decomposition time on `ranks` ranks: its input groups in turn, each as long as its slowest rank."""
    total = 0.0
    for group in architecture_for("llama").input_groups:
        names = [short(name) for name in group]
        owners = World(size=ranks).owners([shapes[name][0] * shapes[name][1] for name in names])
        total += max(sum(seconds[name] for name, owner in zip(names, owners) if owner == rank) for rank in range(ranks))
    return total


def per_kind(manifest: dict) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """Mean seconds and shape of each Linear of a block (q_proj, ..., down_proj) over the run's blocks."""
    times: dict[str, list[float]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for layer in manifest["layers"]:
        times.setdefault(short(layer["name"]), []).append(layer["seconds"])
        shapes[short(layer["name"])] = tuple(layer["shape"])
    return {name: sum(values) / len(values) for name, values in times.items()}, shapes


def measured_rows(folders: list[Path], manifests: list[dict]) -> list[list]:
    rows = []
    for folder, manifest in zip(folders, manifests):
        distributed = manifest["distributed"]
        wall = folder.with_name(folder.name + ".wall")
        rows.append([
            distributed["world_size"],
            ", ".join(rank["device"] for rank in distributed["ranks"]),
            manifest["threads"],
            f"{manifest['compression_seconds']:.1f}",
            f"{float(wall.read_text().split()[-1]):.1f}" if wall.is_file() else "-",
            f"{manifests[0]['compression_seconds'] / manifest['compression_seconds']:.2f}x",
            " / ".join(f"{rank['peak_rss_bytes'] / MIB:.0f}" for rank in distributed["ranks"]),
            "yes" if manifest["files"] == manifests[0]["files"] else "NO",
        ])
    return rows


def estimate(manifest: dict, ranks_measured: list[int], gpu_speedup: float | None) -> str:
    seconds, shapes = per_kind(manifest)
    blocks = manifest["num_blocks"]
    walk = (manifest["compression_seconds"] - sum(layer["seconds"] for layer in manifest["layers"])) / blocks
    fit = [[name, "x".join(map(str, shapes[name])), f"{seconds[name]:.2f}", f"{seconds[name] / cost(shapes[name]) * 1e9:.2f}",
            "x".join(map(str, LLAMA_7B_SHAPES[name])), f"{seconds[name] * cost(LLAMA_7B_SHAPES[name]) / cost(shapes[name]):.0f}"]
           for name in seconds]
    scaled = {name: seconds[name] * cost(LLAMA_7B_SHAPES[name]) / cost(shapes[name]) for name in seconds}
    size = lambda table: sum(rows * cols for rows, cols in table.values())
    walk_7b = walk * size(LLAMA_7B_SHAPES) / size(shapes)
    predicted = {ranks: blocks * (group_seconds(seconds, shapes, ranks) + walk) for ranks in ranks_measured}
    hours = {ranks: LLAMA_7B_BLOCKS * (group_seconds(scaled, LLAMA_7B_SHAPES, ranks) + walk_7b) / 3600
             for ranks in ESTIMATE_RANK_COUNTS}
    gpu = ("" if gpu_speedup is None else
           f" With one GPU rank {gpu_speedup:g}x as fast as one of these CPU threads (--gpu-speedup), that is "
           f"**{hours[ESTIMATE_RANKS] / gpu_speedup:.2f} h on {ESTIMATE_RANKS} GPUs** (estimate).")
    return (
        f"**Estimate, not a measurement**: Llama-2-7B's shapes ({LLAMA_7B_BLOCKS} blocks) from the 1-process run's per-layer "
        f"times, by the arithmetic in sslc_export/scaling.py (cost m·n² + n³ per Linear; a block's groups in turn, each "
        f"group's Linears shared out as compress does; the rest of the compression time here (walk and loading), {walk:.2f} s "
        f"per block, scaled by the block's parameters to {walk_7b:.0f} s; exchanges not modelled).\n\n"
        + markdown_table(["Linear", "shape here", "s here (mean)", "s per 1e9 cost", "7B shape", "7B s (estimate)"], fit)
        + "\nThe same arithmetic on this model predicts "
        + ", ".join(f"{predicted[ranks]:.1f} s on {ranks} rank(s)" for ranks in ranks_measured)
        + " (compare the measured compression seconds above). For 7B at this machine's speed per thread (estimate): "
        + ", ".join(f"{hours[ranks]:.1f} h on {ranks} rank(s)" for ranks in ESTIMATE_RANK_COUNTS[:-1])
        + f", **{hours[ESTIMATE_RANKS]:.1f} h on {ESTIMATE_RANKS} ranks**: a group's Linears are its unit of work, so a "
        f"block takes at least its groups' largest Linears one after another, however many ranks.{gpu} "
        "A GPU's speed over one CPU thread is not measured here: `make gpu-check` prints cuda and cpu compression "
        "times of SmolLM2's shape (its cpu run uses every thread of its machine). Each rank holds the whole model unless "
        "`--streaming` is given (7B in fp32: 27 GB per rank).\n"
    )


def main(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints of the same compression; the first with 1 process."),
    report: Optional[Path] = typer.Option(None, help="Write the section into this Markdown file (between markers)."),
    section: str = typer.Option("distributed", help="The marker name of the section."),
    gpu_speedup: Optional[float] = typer.Option(None, help="How many times faster one GPU rank compresses than one CPU "
                                                "thread here, for the 8-GPU line of the estimate (omit: not stated)."),
) -> None:
    """Tabulate wall time and peak memory per process of the same compression on 1 and N processes, and estimate 7B."""
    manifests = [read_manifest(folder, verify=False) for folder in checkpoints]
    first = manifests[0]
    if any(manifest["fingerprint"] != first["fingerprint"] for manifest in manifests) or world_size(first) != 1:
        raise UserError("pass checkpoints of one compression (same model, method, settings and calibration), the first "
                        "made by 1 process")
    body = (
        f"{first['method']} at ratio {first['ratio']} on {first['num_blocks']} blocks of {Path(first['source_model']['source']).name}, "
        f"calibration {first['calibration']['nsamples']}x{first['calibration']['seqlen']}, the same compression in every "
        "row (`make results-distributed`). Peak RSS is each rank's process, in rank order.\n\n"
        + markdown_table(["processes", "devices", "threads each", "compression s (manifest)", "command wall s",
                          "speedup", "peak RSS MiB per rank", "tensors identical to 1 process"],
                         measured_rows(checkpoints, manifests))
        + "\n" + estimate(first, [world_size(manifest) for manifest in manifests], gpu_speedup)
    )
    print(body)
    if report is not None:
        update_markdown_section(report, section, body)


def world_size(manifest: dict) -> int:
    return manifest["distributed"]["world_size"]


if __name__ == "__main__":
    typer.run(main)
