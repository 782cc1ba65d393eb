"""Tokenizer handling and the layout of CoTexNet's text input.

The text encoder sees, per image (docs/method.md, steps 2–4)::

    SOS  "segmentation area of"  P_1 … P_n  <real-text prompt tokens>  EOS  pad …

``P_i`` are pseudo-token *slots*: real positions (with their position embeddings) whose token
embedding is replaced by the mapped ROI feature of class ``i``. When the sequence would exceed CLIP's
77 tokens, only the real text is truncated, never the template or the pseudo-tokens, and the index of
the true EOS is returned so pooling never lands on a padding or pseudo slot.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BundleError

if TYPE_CHECKING:
    import torch

CONTEXT_LENGTH = 77
BPE_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
#: Packages known to ship OpenAI's CLIP BPE merges file; searched in order without importing them.
BPE_VOCAB_PACKAGES = ("open_clip", "clip")


@dataclass
class TextInputs:
    """Token ids ready for the text encoder, with where the pseudo-tokens and the EOS sit."""

    input_ids: torch.Tensor  # (B, L) long
    eos_index: torch.Tensor  # (B,) long: position of each row's EOS
    pseudo_positions: torch.Tensor  # (n,) long: positions of the pseudo-token slots (same in every row)


def compose_text_inputs(
    template_ids: list[int],
    num_pseudo: int,
    real_ids: list[list[int]],
    *,
    sos_id: int,
    eos_id: int,
    pad_id: int,
    context_length: int = CONTEXT_LENGTH,
) -> TextInputs:
    """Lay out SOS + template + ``num_pseudo`` slots + real text + EOS for each row of ``real_ids``.

    Real text is cut from its end to fit ``context_length``; the template and slots are never cut.
    Rows are padded with ``pad_id`` to the longest row, as CLIP pads after EOS.
    """
    import torch

    head = [sos_id, *template_ids] + [pad_id] * num_pseudo
    budget = context_length - len(head) - 1
    if budget < 0:
        raise ValueError(
            f"{num_pseudo} pseudo-tokens and a {len(template_ids)}-token template do not fit in "
            f"{context_length} text positions"
        )
    rows = [head + list(ids[:budget]) + [eos_id] for ids in real_ids]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    eos_index = torch.tensor([len(row) - 1 for row in rows], dtype=torch.long)
    start = 1 + len(template_ids)
    pseudo_positions = torch.arange(start, start + num_pseudo, dtype=torch.long)
    return TextInputs(input_ids, eos_index, pseudo_positions)


class PromptEncoder:
    """Turns prompt strings into token ids (without SOS/EOS), caching repeated prompts.

    Training sees the same attribute prompts many times (they come from a small vocabulary), so the
    slow BPE runs once per distinct string.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._encode = lru_cache(maxsize=65536)(self._encode_uncached)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [list(self._encode(text)) for text in texts]

    def full_ids(self, text: str) -> list[int]:
        """SOS + text + EOS, truncated to the context length as CLIP's tokenizer does."""
        body = list(self._encode(text))[: CONTEXT_LENGTH - 2]
        return [self.sos_id, *body, self.eos_id]


def find_clip_bpe_vocab() -> Path:
    """Locate OpenAI's CLIP BPE merges file inside an installed package, without importing it.

    ``open-clip-torch`` can be installed with ``--no-deps`` just for this file (its dependencies pull a
    CUDA build of torch).
    """
    for package in BPE_VOCAB_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        candidate = Path(spec.origin).parent / BPE_VOCAB_NAME
        if candidate.is_file():
            return candidate
    raise BundleError(
        f"the CLIP BPE vocabulary ({BPE_VOCAB_NAME}) was not found; it is needed to build the tokenizer of the "
        "'tiny' backbone offline. Install it with: pip install --no-deps open-clip-torch"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_tokenizer_files(directory: Path, bpe_path: Path | None = None) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of CLIP's 49,408-token vocabulary from the BPE merges file.

    The vocabulary is, in order: the 256 byte symbols, the same with ``</w>``, one entry per merge,
    then ``<|startoftext|>`` and ``<|endoftext|>`` — the construction CLIP itself uses.
    """
    bpe_path = bpe_path or find_clip_bpe_vocab()
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    _write_vocabulary(directory, {tok: i for i, tok in enumerate(vocab)}, merges)


def _write_vocabulary(directory: Path, vocabulary: dict[str, int], merges) -> None:
    """``vocab.json`` and ``merges.txt``, the files every transformers major loads a CLIP tokenizer from."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """Save a CLIP tokenizer so that transformers 4 and 5 both load it: ``save_pretrained``, plus ``vocab.json``
    and ``merges.txt`` where that wrote only ``tokenizer.json`` (transformers 5), taken from the same BPE model."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    _write_vocabulary(directory, model["vocab"], merges)


def load_tokenizer(directory: str | Path):
    """Load a CLIP tokenizer from local files only (never the network)."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    if not (directory / "vocab.json").is_file() or not (directory / "merges.txt").is_file():
        raise BundleError(f"{directory}: tokenizer files vocab.json and merges.txt are missing")
    try:  # transformers meets a broken vocabulary with a misleading ImportError about protobuf
        vocabulary = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise BundleError(f"{directory / 'vocab.json'}: not a valid tokenizer vocabulary ({error})") from None
    if not isinstance(vocabulary, dict) or not vocabulary:
        raise BundleError(f"{directory / 'vocab.json'}: not a valid tokenizer vocabulary (expected a non-empty JSON "
                          f"object of token -> id)")
    return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)


@lru_cache(maxsize=1)
def offline_clip_tokenizer_dir() -> Path:
    """A per-user cache folder holding CLIP tokenizer files built from the installed BPE vocabulary."""
    import tempfile

    directory = Path(tempfile.gettempdir()) / f"cotexnet-clip-tokenizer-{_vocab_fingerprint()}"
    if not (directory / "merges.txt").is_file():
        staging = Path(tempfile.mkdtemp(prefix="cotexnet-tokenizer-"))
        write_clip_tokenizer_files(staging)
        try:
            staging.rename(directory)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _vocab_fingerprint() -> str:
    import hashlib

    return hashlib.sha256(find_clip_bpe_vocab().read_bytes()).hexdigest()[:12]
