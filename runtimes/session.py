"""An onnxruntime session over an exported causal LM, with the KV-cache loop that the
optimum graph expects (input_ids, attention_mask, position_ids, past_key_values.*)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtimes.providers import get_provider
from sslc_export.errors import UserError

ONNX_FILE = "model.onnx"


class OnnxCausalLM:
    def __init__(self, folder: Path, provider: str = "cpu", threads: int | None = None):
        path = Path(folder) / ONNX_FILE
        if not path.is_file():
            raise UserError(f"{folder} has no {ONNX_FILE}: pass a folder written by `sslc-export export`")
        self.session = get_provider(provider).open_session(path, threads)
        config = json.loads((Path(folder) / "config.json").read_text())
        self.layers = config["num_hidden_layers"]
        self.kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
        self.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.layers)]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run `ids` (batch x new tokens) after `past`; return logits and the grown cache."""
        batch, new = ids.shape
        seen = past[0].shape[2]
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, seen + new), dtype=np.int64),
            "position_ids": np.arange(seen, seen + new, dtype=np.int64)[None].repeat(batch, 0),
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        feed = {name: value for name, value in feed.items() if name in self.input_names}
        outputs = self.session.run(self.output_names, feed)
        return outputs[0], outputs[1:]
