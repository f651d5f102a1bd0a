"""Provider registry: adding an execution provider is one new file and one line here."""
from __future__ import annotations

from sslc_export.runtimes.providers.base import Availability, Provider
from sslc_export.runtimes.providers.cpu import Cpu
from sslc_export.runtimes.providers.cuda import Cuda
from sslc_export.runtimes.providers.openvino import OpenVino
from sslc_export.runtimes.providers.tensorrt import TensorRt
from sslc_export.errors import UserError

PROVIDERS: dict[str, Provider] = {provider.name: provider for provider in (Cpu(), Cuda(), TensorRt(), OpenVino())}


def get_provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise UserError(f"unknown provider '{name}': choose one of {', '.join(PROVIDERS)}") from None


__all__ = ["PROVIDERS", "Availability", "Provider", "get_provider"]
