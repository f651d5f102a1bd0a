"""Method registry: adding a method is one new file and one line here."""
from __future__ import annotations

from sslc_export.errors import UserError
from sslc_export.methods.base import Decomposition, Method, Settings
from sslc_export.methods.hss import Hss
from sslc_export.methods.losparse import LoSparse
from sslc_export.methods.magnitude import Magnitude
from sslc_export.methods.sparsegpt import SparseGpt
from sslc_export.methods.sslc import Sslc
from sslc_export.methods.svd import Svd
from sslc_export.methods.wanda import Wanda

METHODS: dict[str, Method] = {method.name: method for method in (Sslc(), Magnitude(), Wanda(), SparseGpt(), Svd(), LoSparse(), Hss())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Decomposition", "Method", "Settings", "get_method"]
