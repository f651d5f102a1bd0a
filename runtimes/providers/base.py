"""One small interface per execution provider: is it usable here (and if not, why), and how
to open an onnxruntime session on it. Adding a provider is one file and a registry line."""
from __future__ import annotations

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

    def availability(self) -> Availability:
        if self.execution_provider in ort.get_available_providers():
            return Availability(True, f"{self.execution_provider} is in this onnxruntime build")
        return Availability(False, f"{self.execution_provider} is not in this onnxruntime build ({ort.__version__}); {self.needs}")

    def provider_options(self) -> dict:
        return {}

    def open_session(self, path: Path, threads: int | None = None) -> ort.InferenceSession:
        """A session on exactly this provider: never a silent fall-back to CPU."""
        state = self.availability()
        if not state.available:
            raise UserError(f"provider {self.name} is not available: {state.reason}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=[(self.execution_provider, self.provider_options())])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise UserError(f"onnxruntime could not load {path} on {self.name} ({type(exc).__name__}: {str(exc)[:200]})") from None
        if session.get_providers()[0] != self.execution_provider:
            raise UserError(f"onnxruntime opened {path} on {session.get_providers()[0]} instead of {self.execution_provider}")
        return session
