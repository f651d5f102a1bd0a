"""genai_config.json: what onnxruntime-genai needs to run an exported folder unmodified.

optimum's decoder export already uses the input and output names genai expects by default
(input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits,
present.N.key/value); the config names them anyway, with the model's shapes and end tokens.
"""
from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from sslc_export.models.architectures import Llama

GENAI_CONFIG = "genai_config.json"


def genai_config(config: PretrainedConfig, architecture: Llama, tokenizer: PreTrainedTokenizerBase, onnx_file: str,
                 custom_ops_library: str | None = None, share_buffer: bool = False) -> dict:
    """genai picks its model class by the family's genai_type.
    A folder whose graph uses our operators names the kernel library (an absolute path: genai loads it as given);
    a graph whose every layer is a GroupQueryAttention lets genai keep one KV buffer (share_buffer)."""
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom_ops_library:
        session_options["custom_ops_library"] = custom_ops_library
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = tokenizer.eos_token_id
    return {
        "model": {
            "type": architecture.genai_type,
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            "context_length": config.max_position_embeddings,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": session_options,
                "filename": onnx_file,
                "head_size": head_size,
                "hidden_size": config.hidden_size,
                "num_attention_heads": heads,
                "num_key_value_heads": config.num_key_value_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "max_length": config.max_position_embeddings, "min_length": 0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0, "early_stopping": True,
            "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
        },
    }
