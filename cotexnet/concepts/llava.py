"""LLaVA backend: transformers' LLaVA (1.5 7B/13B or a compatible model) run locally.

The paper asks LLaVA-1.5-13B for the attributes; that needs more than 30 GB of GPU memory in float16,
the 7B model about 15 GB. Any checkpoint that ``LlavaForConditionalGeneration`` and
``AutoProcessor`` load works: a Hugging Face id (downloaded once into the Hugging Face cache) or a
local directory. transformers and torch are imported only when this backend is created.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, error_summary
from .lmm import LMMBackend

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DTYPES = ("float16", "bfloat16", "float32")


class LlavaBackend(LMMBackend):
    """Asks a local LLaVA model; ``device``/``dtype`` ``"auto"`` pick CUDA with float16 when present."""

    name = "llava"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 96,
        retries: int = 2,
        local_files_only: bool = False,
    ):
        import torch
        import transformers
        from packaging.version import Version
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        super().__init__(str(model), retries=retries, backoff=0.0)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        torch_dtype = getattr(torch, dtype)
        if str(model).startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
            raise ConfigError(f"llava model {model!r}: no such folder (give a LLaVA model folder or a Hugging Face id)")
        # transformers 4.56 renamed ``torch_dtype`` to ``dtype`` (the old name still works, with a warning).
        dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        try:
            self.processor = AutoProcessor.from_pretrained(self.model, local_files_only=local_files_only)
            self.network = LlavaForConditionalGeneration.from_pretrained(
                self.model, local_files_only=local_files_only, **{dtype_key: torch_dtype}
            ).to(self.device).eval()
        except (OSError, ValueError, KeyError) as error:  # transformers' ways of saying "not a LLaVA model here"
            raise ConfigError(f"llava model {model!r}: could not be loaded as a LLaVA model ({error_summary(error)})") \
                from None
        self.max_new_tokens = max_new_tokens

    def ask(self, image: np.ndarray, question: str, temperature: float) -> str:
        import torch

        image_token = getattr(self.processor, "image_token", "<image>")
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        else:  # LLaVA-1.5's own conversation format
            text = f"USER: {image_token}\n{question} ASSISTANT:"
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.network.dtype)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        tokenizer = self.processor.tokenizer
        with torch.inference_mode():
            output = self.network.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                **sampling,
            )
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
