"""OpenAI-compatible HTTP backend: any server with ``POST {base_url}/chat/completions`` and image input.

Ollama (``http://localhost:11434/v1``), vLLM, LM Studio, llama.cpp's server and hosted APIs speak it.
The ROI image travels as a base64 PNG data URL. The API key, when the server needs one, is read from
the environment variable named by ``api_key_env`` and sent as a bearer token; it is never logged,
never put in an error message (server replies that echo it are redacted) and never in the cache.
Only the standard library is used (urllib), plus Pillow to encode the PNG.
"""
from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from ..errors import ConfigError
from .lmm import LMMBackend, LMMUnavailableError

DEFAULT_BASE_URL = "http://localhost:11434/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


class OpenAIBackend(LMMBackend):
    """Asks an OpenAI-compatible chat-completions server; ``timeout`` is per request, in seconds."""

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_tokens: int = 200,
    ):
        if not model:
            raise ConfigError("model: the openai backend needs the model name the server serves")
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"base_url: expected an http(s) URL such as {DEFAULT_BASE_URL}, got {base_url!r}")
        super().__init__(model, retries=retries, backoff=backoff)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout = float(timeout)
        self.max_tokens = max_tokens
        self._api_key = os.environ.get(api_key_env) if api_key_env else None

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, url={self.url!r})"

    def ask(self, image: np.ndarray, question: str, temperature: float) -> str:
        body = {
            "model": self.model,
            "temperature": temperature,
            "max_tokens": self.max_tokens,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_base64(image)}},
                ],
            }],
        }
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read(300).decode("utf-8", "replace")
            raise LMMUnavailableError(self._redact(f"HTTP {error.code} from {self.url}: {detail}")) from None
        except TimeoutError:
            raise LMMUnavailableError(f"no answer from {self.url} within {self.timeout:g} s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise LMMUnavailableError(f"no answer from {self.url} within {self.timeout:g} s") from None
            raise LMMUnavailableError(self._redact(f"cannot reach {self.url}: {error.reason}")) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            excerpt = raw[:120].decode("utf-8", "replace")
            raise LMMUnavailableError(self._redact(f"unreadable reply from {self.url}: {excerpt!r}")) from None
        if isinstance(content, list):  # content given as parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise LMMUnavailableError(f"unreadable reply from {self.url}: message content is {type(content).__name__}")
        return self._redact(content)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def _png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
