"""ONNX stages: dense export through optimum, graph rewrite to sparse-plus-low-rank, validation."""
