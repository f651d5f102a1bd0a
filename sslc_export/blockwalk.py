"""Calibration activations through one decoder block, group by group ("true sequential").

Each input group's statistics are gathered from the block with every earlier group already
compressed. The walk follows the block's residual branches (models/architectures.py):
norm(h) feeds the branch's first group; the body is run once, stopped at its output Linear,
to capture that Linear's input; the branch's result is then h + output(captured), so no
part of the block is computed twice. (Running the whole block up to each hooked Linear, as
before, cost about twice the arithmetic: 48 s more of a SmolLM2 sslc run here, docs/results.md.)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sslc_export.models.architectures import BlockInputs, Llama, ResidualBranch
from sslc_export.calibration import InputStatistics

CompressGroup = Callable[[tuple[str, ...], InputStatistics], None]  # replaces those Linears of the block


class _InputCaptured(Exception):
    """Raised by the capture hook: the rest of the body is not needed."""


def _statistics(activations: torch.Tensor, batch_size: int) -> InputStatistics:
    stats = InputStatistics(activations.shape[-1], device=activations.device)
    for batch in activations.split(batch_size):
        stats.add_batch(batch)
    return stats


def _capture_input(body: nn.Module, output: nn.Module, batch: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input `output` receives when `body` runs on `batch`."""
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _InputCaptured

    handle = output.register_forward_pre_hook(capture)
    try:
        body(batch, **kwargs)
    except _InputCaptured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(body).__name__} never called its output Linear: the architecture description is wrong")
    return captured[0]


def _map(function: Callable[[torch.Tensor], torch.Tensor], activations: torch.Tensor, size: int) -> torch.Tensor:
    """`function` over batches, written into one preallocated result: a list then torch.cat would hold it twice."""
    result = None
    for start in range(0, activations.shape[0], size):
        out = function(activations[start : start + size])
        if result is None:
            result = out.new_empty((activations.shape[0], *out.shape[1:]))
        result[start : start + out.shape[0]] = out
    return result


def _branch(block: nn.Module, branch: ResidualBranch, kwargs: dict, hidden: torch.Tensor, inputs: BlockInputs,
            compress_group: CompressGroup) -> None:
    size = inputs.batch_size
    normed = _map(block.get_submodule(branch.norm), hidden, size)
    compress_group(branch.first, _statistics(normed, size))
    body, output_name = block.get_submodule(branch.body), branch.output
    captured = _map(lambda batch: _capture_input(body, block.get_submodule(output_name), batch, kwargs), normed, size)
    del normed
    compress_group((branch.output,), _statistics(captured, size))
    output = block.get_submodule(branch.output)  # the compressed Linear now
    for start in range(0, hidden.shape[0], size):
        hidden[start : start + size] += output(captured[start : start + size])


def walk_block(block: nn.Module, architecture: Llama, inputs: BlockInputs, compress_group: CompressGroup) -> torch.Tensor:
    """Compress the block's Linears in input-group order; return its output on the calibration activations.

    The activations are advanced in place (inputs.hidden is the block's output afterwards): calibration
    activations are the walk's largest tensors, and no caller needs the block's input again."""
    hidden = inputs.hidden
    with torch.no_grad():
        for branch in architecture.branches:
            _branch(block, branch, architecture.branch_kwargs(branch, inputs), hidden, inputs, compress_group)
    return hidden
