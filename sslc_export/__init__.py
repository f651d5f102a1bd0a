"""sslc-export: sparse plus low-rank compression of LLMs, exported to ONNX."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# models/, runtimes/ and cli.py sit at the repository's top level but are this package's modules
# (sslc_export.models, sslc_export.runtimes, sslc_export.cli: no other distribution's `models` collides with
# them). An install maps them in (pyproject.toml); a checkout used without one (`make gpu-check` on a machine
# with no registry) finds them here.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "models" / "__init__.py").is_file():
    __path__.append(str(_checkout))
