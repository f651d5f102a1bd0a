"""Dense export through optimum-onnx's exporter (task text-generation-with-past), so the
graph is the one ORTModelForCausalLM and onnxruntime-genai already know how to drive.

A compressed model is exported as its dense equivalent (each Linear's weight = S + U·V);
the rewrite stage then replaces those MatMuls, checking weight identity as it goes.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sslc_export.layers import SparseLowRankLinear, replace_linear

TASK = "text-generation-with-past"
ONNX_FILE = "model.onnx"


def dense_equivalent(model: PreTrainedModel) -> dict[str, SparseLowRankLinear]:
    """Swap every SparseLowRankLinear for an nn.Linear holding S + U·V, in place; return the originals."""
    originals = {name: module for name, module in model.named_modules() if isinstance(module, SparseLowRankLinear)}
    for name, module in originals.items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.sparse + module.u @ module.v)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        replace_linear(model, name, linear)
    return originals


def export_dense(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """Write model.onnx, config and tokenizer files into folder (which the caller makes atomic)."""
    from optimum.exporters.onnx import onnx_export_from_model

    logging.getLogger("optimum").setLevel(logging.ERROR)
    with warnings.catch_warnings(), _sized_post_process_saves():  # tracer chatter about data-dependent branches that optimum's config handles
        warnings.simplefilter("ignore")
        onnx_export_from_model(model, folder, task=TASK, do_validation=False, preprocessors=[tokenizer])
    return folder / ONNX_FILE


@contextmanager
def _sized_post_process_saves():
    """optimum's post-processing (it de-duplicates a tied embedding / lm_head) saves through
    check_and_save_model, which asks protobuf for ByteSize(): past 2 GB protobuf >= 5 raises
    EncodeError there (issue 14). For the export, that save goes through save_onnx instead, which
    decides external data by the tensors' sizes; the file is checked by path, as onnx advises past 2 GB."""
    import onnx
    from optimum.onnx import graph_transformations

    from sslc_export.onnx.onnx_io import save_onnx

    def check_and_save(model: onnx.ModelProto, save_path) -> None:
        path = Path(save_path)
        path.unlink(missing_ok=True)
        path.with_name(path.name + "_data").unlink(missing_ok=True)  # optimum's own external-data name
        save_onnx(model, path)
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as exc:  # optimum ignores the same: contrib ops unknown to the checker
            if "No Op registered for" not in str(exc):
                raise

    original = graph_transformations.check_and_save_model
    graph_transformations.check_and_save_model = check_and_save
    try:
        yield
    finally:
        graph_transformations.check_and_save_model = original
