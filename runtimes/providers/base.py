"""One small interface per execution provider: is it usable here (and if not, why), and how
to open an onnxruntime session on it. Adding a provider is one file and a registry line."""
from __future__ import annotations

import os
import subprocess
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnxruntime as ort

from sslc_export.errors import UserError


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str


class Provider(ABC):
    name: ClassVar[str]
    execution_provider: ClassVar[str]
    needs: ClassVar[str] = ""  # what to install or have when it is missing
    device_type: ClassVar[str] = "cpu"  # where its inputs, outputs and KV cache live (OrtValue device names)

    def availability(self) -> Availability:
        if self.execution_provider in ort.get_available_providers():
            return Availability(True, f"{self.execution_provider} is in this onnxruntime build")
        return Availability(False, f"{self.execution_provider} is not in this onnxruntime build ({ort.__version__}); {self.needs}")

    def device_memory_bytes(self) -> int | None:
        """GPU memory this process holds (onnxruntime's arena keeps its peak), from nvidia-smi; None off-GPU."""
        if self.device_type != "cuda":
            return None
        try:
            listing = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        used = [int(mib) for pid, mib in (line.split(", ") for line in listing.splitlines() if ", " in line) if int(pid) == os.getpid()]
        return used[0] * 1024 * 1024 if used else None

    def provider_options(self) -> dict:
        return {}

    def open_session(self, path: Path, threads: int | None = None, custom_ops: str | None = None,
                     profile_prefix: Path | None = None) -> ort.InferenceSession:
        """A session on exactly this provider: never a silent fall-back to CPU. `custom_ops` names the
        opset domain of our own operators when the graph uses them (export.json says so); with
        `profile_prefix` onnxruntime writes a per-node trace (see runtimes/profile.py)."""
        state = self.availability()
        if not state.available:
            raise UserError(f"provider {self.name} is not available: {state.reason}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_prefix)
        if custom_ops:
            from sslc_export.runtimes import kernels

            if self.device_type != "cpu":
                raise UserError(f"this export uses our {custom_ops} operators, which run on the cpu provider only")
            kernels.register(options)
        try:
            session = ort.InferenceSession(str(path), options, providers=[(self.execution_provider, self.provider_options())])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise UserError(f"onnxruntime could not load {path} on {self.name} ({type(exc).__name__}: {str(exc)[:200]})") from None
        if session.get_providers()[0] != self.execution_provider:
            raise UserError(f"onnxruntime opened {path} on {session.get_providers()[0]} instead of {self.execution_provider}")
        return session
