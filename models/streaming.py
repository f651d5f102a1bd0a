"""Block streaming: keep only one decoder block's weights in memory at a time.

The model is built on the meta device; everything outside the decoder blocks (embeddings,
final norm, lm_head) is read from the safetensors shards at once, and each block's weights
only when the compression driver reaches it. Peak memory is then the non-block weights plus
one block plus the calibration activations, not the whole model.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from sslc_export.models.architectures import Llama
from sslc_export.errors import UserError

INDEX_FILE = "model.safetensors.index.json"


def shard_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"{index} is not a valid shard index ({exc})") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{folder} has no model.safetensors or {INDEX_FILE}: streaming needs safetensors weights")
    try:
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"could not read {single} ({exc}): is it complete and valid?") from None


def return_freed_memory_to_the_os() -> None:
    """glibc raises its mmap threshold after large frees, so later block-sized temporaries come
    from the heap and are never given back: RSS then grows with every streamed block. A fixed
    threshold (1 MiB) keeps peak memory at one block."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


class BlockStreamer:
    def __init__(self, folder: Path, architecture: Llama):
        return_freed_memory_to_the_os()
        self.files = shard_map(folder)
        self.prefix = architecture.blocks_path + "."
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():  # parameters on meta; buffers (rotary tables) stay real
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        self.model.eval()
        self._load(lambda name: not name.startswith(self.prefix))
        self.model.tie_weights()
        missing = [name for name, p in self.model.named_parameters() if not name.startswith(self.prefix) and p.device.type == "meta"]
        if missing:
            raise UserError(f"{folder} has no weights for {missing[:3]}: the model folder is incomplete")

    def _load(self, wanted) -> None:
        names = [name for name, _ in self.model.named_parameters(remove_duplicate=False) if wanted(name)]
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name in self.files:
                by_file.setdefault(self.files[name], []).append(name)
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in file_names:
                        # A copy, so the tensor does not pin the shard's memory map after the block is released.
                        set_module_tensor_to_device(self.model, name, "cpu", value=handle.get_tensor(name).float().clone())
            except (SafetensorError, OSError) as exc:
                raise UserError(f"could not read {file} ({exc}): is it complete and valid?") from None

    def load_block(self, index: int) -> None:
        block_prefix = f"{self.prefix}{index}."
        self._load(lambda name: name.startswith(block_prefix))
        missing = [name for name, p in self.model.named_parameters() if name.startswith(block_prefix) and p.device.type == "meta"]
        if missing:
            raise UserError(f"block {index} has no weights for {missing[:3]} in the safetensors shards: the model folder is incomplete")

    @staticmethod
    def release(module: nn.Module) -> None:
        """Free a finished module's tensors (it has been written to the checkpoint)."""
        module.to("meta")
