"""The exported folder through onnxruntime-genai (Microsoft's generation loop, reading the
folder's genai_config.json), so users can check that a folder runs unmodified there and
compare its speed and greedy tokens with our own loop (runtimes/session.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from sslc_export.runtimes.session import custom_ops_domain
from sslc_export.errors import UserError
from sslc_export.onnx.genai import GENAI_CONFIG


class GenaiCausalLM:
    def __init__(self, folder: Path, threads: int | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise UserError("onnxruntime-genai is not installed: pip install onnxruntime-genai==0.18.0") from None
        if not (Path(folder) / GENAI_CONFIG).is_file():
            raise UserError(f"{folder} has no {GENAI_CONFIG}: re-export it with this version of `sslc-export export`")
        self._og = og
        config = og.Config(str(folder))
        config.clear_providers()  # CPU; the folder's own provider list is for other machines
        session_options: dict = {"intra_op_num_threads": threads} if threads else {}
        if custom_ops_domain(folder):  # this machine's build, wherever the folder was exported
            from sslc_export.runtimes import kernels

            session_options["custom_ops_library"] = str(kernels.require())
        if session_options:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
        self.model = og.Model(config)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens after the prompt and the seconds each decode step took (the first
        step includes nothing of the prompt: append_tokens runs the prefill)."""
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens, batch_size=1)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens([prompt_ids])
        tokens: list[int] = []
        seconds: list[float] = []
        while len(tokens) < max_new_tokens and not generator.is_done():
            start = time.perf_counter()
            generator.generate_next_token()
            seconds.append(time.perf_counter() - start)
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, seconds
