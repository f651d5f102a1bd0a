"""Random models with a small trained tokenizer: the tiny ones the tests run on, and large
ones (several GB on disk) that show block streaming compresses a model bigger than the RAM
a run is given.

    python -m sslc_export.models.synthetic OUT_DIR --hidden 1536 --intermediate 6144 --layers 20
    python -m sslc_export.models.synthetic OUT_DIR --model-type qwen2 --hidden 896 --intermediate 4864 --layers 24 \
        --heads 14 --kv-heads 2 --vocab 151936 --max-positions 32768       # Qwen2-0.5B's shape

Biases and norm weights are random too (transformers starts them at 0 and 1), so a test sees whether a stage
drops or mixes them up.
"""
from __future__ import annotations

from pathlib import Path

import torch
import typer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from sslc_export.models.architectures import ARCHITECTURES, architecture_for
from sslc_export.corpus import CALIBRATION_TEXTS

TINY_DIMS = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def small_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the bundled calibration text, with the chat end token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([CALIBRATION_TEXTS["prose"].read_text()[:60000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|endoftext|>")


def build_random_model(folder: Path, model_type: str = "llama", seed: int = 0, **dims: int) -> Path:
    """A randomly initialised model folder (safetensors shards of at most 1 GB, config, tokenizer) of any family
    models/architectures.py supports. A vocab_size above the tokenizer's pads the embedding with rows no token
    maps to (a real model's shape); extra keywords go to the family's config (e.g. sliding_window)."""
    architecture_for(model_type)
    tokenizer = small_tokenizer()
    dims = {**TINY_DIMS, **dims}
    dims.setdefault("head_dim", dims["hidden_size"] // dims["num_attention_heads"])  # Qwen3's default is 128, not this
    config = AutoConfig.for_model(
        model_type, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=None,
        **{"vocab_size": len(tokenizer), "max_position_embeddings": 256, "tie_word_embeddings": True, **dims},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize_biases_and_norms(model)
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    return folder


def randomize_biases_and_norms(model: PreTrainedModel) -> None:
    """Biases of the scale of a projection's output, norm weights in [0.5, 1.5]."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
            elif "norm" in name.rsplit(".", 2)[-2]:
                parameter.uniform_(0.5, 1.5)


def main(
    out: Path = typer.Argument(..., help="Folder to write."),
    model_type: str = typer.Option("llama", help=f"One of {', '.join(ARCHITECTURES)}."),
    hidden: int = typer.Option(1536, help="hidden_size"),
    intermediate: int = typer.Option(6144, help="intermediate_size"),
    layers: int = typer.Option(20, help="num_hidden_layers"),
    heads: int = typer.Option(12, help="num_attention_heads"),
    kv_heads: int = typer.Option(None, help="num_key_value_heads (default: = heads)"),
    vocab: int = typer.Option(None, help="vocab_size (default: the small tokenizer's 384; larger pads the embedding)"),
    max_positions: int = typer.Option(256, help="max_position_embeddings"),
) -> None:
    extra = {} if vocab is None else {"vocab_size": vocab}
    build_random_model(out, model_type, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                       max_position_embeddings=max_positions, **extra)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {size / 1e9:.2f} GB of weights")


if __name__ == "__main__":
    typer.run(main)
