"""An onnxruntime session over an exported causal LM, with the KV-cache loop that the
optimum graph expects (input_ids, attention_mask, position_ids, past_key_values.*).

On a GPU provider the KV cache stays in device memory between steps through IO binding:
copying it to the host and back every token would cost more than the step itself. The
same binding path runs on CPU too (`io_binding=True`), which is how it is tested without a GPU.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np
import onnxruntime as ort

from sslc_export.runtimes.providers import get_provider
from sslc_export.errors import UserError

ONNX_FILE = "model.onnx"
EXPORT_MANIFEST = "export.json"
Cache = list[Union[np.ndarray, ort.OrtValue]]  # past keys and values: host arrays, or device tensors when bound


def custom_ops_domain(folder: Path) -> str | None:
    """The opset domain of our own operators if the folder's graph uses them (recorded in export.json)."""
    record = Path(folder) / EXPORT_MANIFEST
    return json.loads(record.read_text()).get("custom_ops") if record.is_file() else None


class OnnxCausalLM:
    def __init__(self, folder: Path, provider: str = "cpu", threads: int | None = None, io_binding: bool | None = None,
                 profile_prefix: Path | None = None):
        path = Path(folder) / ONNX_FILE
        if not path.is_file():
            raise UserError(f"{folder} has no {ONNX_FILE}: pass a folder written by `sslc-export export`")
        chosen = get_provider(provider)
        self.session = chosen.open_session(path, threads, custom_ops_domain(folder), profile_prefix)
        self.device = chosen.device_type
        self.io_binding = self.device != "cpu" if io_binding is None else io_binding
        config = json.loads((Path(folder) / "config.json").read_text())
        self.layers = config["num_hidden_layers"]
        self.kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
        self.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.input_names = {i.name for i in self.session.get_inputs()}
        # Asked for by name: graphs differ in output order (optimum's interleaves keys and values per
        # layer, onnxruntime-genai's model builder lists all keys first), the cache is per layer.
        self.output_names = ["logits"] + [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]
        missing = set(self.output_names) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise UserError(f"{path} lacks the outputs {', '.join(sorted(missing)[:3])}...: not a causal LM with a KV cache")

    def empty_past(self, batch: int = 1) -> Cache:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        empty = np.zeros(shape, dtype=np.float32)
        if self.io_binding:
            return [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in range(2 * self.layers)]
        return [empty for _ in range(2 * self.layers)]

    def _feed(self, ids: np.ndarray, seen: int) -> dict[str, np.ndarray]:
        batch, new = ids.shape
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, seen + new), dtype=np.int64),
            "position_ids": np.arange(seen, seen + new, dtype=np.int64)[None].repeat(batch, 0),
        }
        return {name: value for name, value in feed.items() if name in self.input_names}

    def step(self, ids: np.ndarray, past: Cache) -> tuple[np.ndarray, Cache]:
        """Run `ids` (batch x new tokens) after `past`; return logits (on the host) and the grown cache."""
        if self.io_binding:
            return self._bound_step(ids, past)
        feed = self._feed(ids, past[0].shape[2])
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outputs = self.session.run(self.output_names, feed)
        return outputs[0], outputs[1:]

    def _bound_step(self, ids: np.ndarray, past: Cache) -> tuple[np.ndarray, Cache]:
        binding = self.session.io_binding()
        for name, value in self._feed(ids, past[0].shape()[2]).items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
        for i in range(self.layers):
            binding.bind_ortvalue_input(f"past_key_values.{i}.key", past[2 * i])
            binding.bind_ortvalue_input(f"past_key_values.{i}.value", past[2 * i + 1])
        for name in self.output_names:
            binding.bind_output(name, self.device, 0)  # onnxruntime allocates each output on the device
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]
