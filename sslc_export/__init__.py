"""sslc-export: sparse plus low-rank compression of LLMs, exported to ONNX."""

__version__ = "0.1.0"
