"""Compression on several processes: `torchrun --nproc-per-node N` or `accelerate launch` (they set WORLD_SIZE,
RANK and LOCAL_RANK); each rank computes on its own device (cuda:LOCAL_RANK with --device cuda, else the CPU).

Blocks stay sequential and every rank runs the same block walk on the same data, so every rank holds the same
statistics and advances the same compressed block; only the decompositions of an input group's Linears (the
expensive part) are shared out (`owners`), and their results exchanged. Each rank's work is deterministic and
results travel pickled from the CPU, so with the same threads per process (OMP_NUM_THREADS) the checkpoint does not
depend on the number of ranks, bit for bit.

A failure on one rank must not leave the others waiting in a collective: every exchange carries each rank's
outcome (value or error), so an error anywhere becomes the same RankFailure on every rank at the same exchange.
A plain process (no launcher) is a World of one that never touches torch.distributed. (torch is imported where it
is used: the CLI asks is_main_process before it has loaded torch.)
"""
from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sslc_export.errors import UserError, describe_os_error

LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class RankFailure(UserError):
    """A failure on some rank, raised on every rank (the CLI prints it once, on rank 0)."""


@dataclass(frozen=True)
class _Outcome:
    error: str | None
    value: Any = None


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None  # None: one plain process, no torch.distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> str:
        """The device this rank computes on: --device cuda means cuda:LOCAL_RANK under a launcher."""
        if self.backend is None or not name.startswith("cuda"):
            return name
        if name != "cuda":
            raise UserError(f"--device {name}: under a launcher each rank uses cuda:LOCAL_RANK; pass --device cuda")
        return f"cuda:{self.local_rank}"

    def record(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}

    def owners(self, sizes: list[int]) -> list[int]:
        """The rank that decomposes each of a group's Linears (by parameter count): largest first to the least loaded
        rank, ties to the lower rank and the earlier Linear, so every rank computes the same assignment."""
        load = [0] * self.size
        owner = [0] * len(sizes)
        for position in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            owner[position] = rank
            load[rank] += sizes[position]
        return owner

    def together(self, step: Callable[[], Any]) -> Any:
        """step() on every rank, its value kept on each; a failure on any rank raises RankFailure on all."""
        return step() if self.backend is None else self._exchange(step, share=False)[0]

    def gather(self, produce: Callable[[], Any]) -> list:
        """Every rank's value, in rank order, on every rank."""
        return [produce()] if self.backend is None else self._exchange(produce, share=True)[1]

    def share(self, produce: Callable[[], dict]) -> dict:
        """Every rank's dict merged, on every rank (values must be picklable; tensors on the CPU)."""
        merged: dict = {}
        for part in self.gather(produce):
            merged.update(part)
        return merged

    def broadcast(self, produce: Callable[[], Any]) -> Any:
        """Rank 0's value on every rank (produce runs on rank 0 only)."""
        if self.backend is None:
            return produce()
        return self._exchange(produce if self.is_main else lambda: None, share=True)[1][0]

    def _exchange(self, produce: Callable[[], Any], share: bool) -> tuple[Any, list]:
        """produce() here, then every rank's outcome (its value too when `share`) everywhere: (this rank's value,
        the values in rank order). Any exchange pairs with any other, so a rank that failed outside an inner
        exchange still meets the others at their next one."""
        value = None
        try:
            value = produce()
            mine = _Outcome(None, value if share else None)
        except RankFailure:
            raise  # already agreed on by every rank at an inner exchange
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks, whatever its type
            if not isinstance(exc, UserError) and describe_os_error(exc) is None:
                traceback.print_exc()  # a bug: its traceback, on the rank where it happened
            mine = _Outcome(_one_line(exc))
        import torch.distributed as dist

        outcomes: list[_Outcome | None] = [None] * self.size
        dist.all_gather_object(outcomes, mine)
        failed = {rank: outcome.error for rank, outcome in enumerate(outcomes) if outcome.error is not None}
        if failed:
            raise RankFailure(_failure_message(failed, self.size))
        return value, [outcome.value for outcome in outcomes]


def _one_line(exc: Exception) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    text = describe_os_error(exc) or f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0] if text else type(exc).__name__


def _failure_message(failed: dict[int, str], size: int) -> str:
    """One line: the error itself when every rank hit the same one (bad input), else which rank failed and why."""
    messages = set(failed.values())
    if len(failed) == size and len(messages) == 1:
        return messages.pop()
    rank, message = min(failed.items())
    others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    return f"rank {rank} of {size} failed{others}, so every rank stopped: {message}"


def free_port() -> int:
    """A free TCP port for the ranks' rendezvous when launching them on this machine (tests, make gpu-check)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched() -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate launch)."""
    return all(name in os.environ for name in LAUNCHER_ENV)


def is_main_process() -> bool:
    """Rank 0, or a plain process: the one that prints."""
    return os.environ.get("RANK", "0") == "0" or not launched()


@contextmanager
def join(device: str) -> Iterator[World]:
    """The world this process belongs to: torch.distributed set up from the launcher's environment (nccl for
    --device cuda, gloo on the CPU) and torn down afterwards; a World of one for a plain process."""
    if not launched():
        yield World()
        return
    try:
        size, rank, local_rank = (int(os.environ[name]) for name in LAUNCHER_ENV)
    except ValueError:
        raise UserError(f"{', '.join(LAUNCHER_ENV)} must be integers (set by torchrun or accelerate launch)") from None
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise UserError(f"--device {device}: rank {rank} needs cuda:{local_rank}, but this process sees "
                            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s)")
        torch.cuda.set_device(local_rank)  # nccl's object exchanges go through the current device
    dist.init_process_group(backend, rank=rank, world_size=size)
    try:
        yield World(size, rank, local_rank, backend)
    finally:
        dist.destroy_process_group()
