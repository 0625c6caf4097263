"""CLIP tokenizers built offline from the BPE vocabulary that the ``openai-clip`` PyPI package ships.

Stable Diffusion's tokenizers (SD1/SD2/SDXL) all use OpenAI's CLIP BPE; only the padding token
differs. Building them from the package's ``bpe_simple_vocab_16e6.txt.gz`` means nothing is
fetched from a model hub. The ``clip`` package itself is never imported (it needs torchvision).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

from ..errors import MuralistError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
VOCAB_SIZE = 49408
# The first 48,894 merges of OpenAI's file are the ones CLIP was trained with.
N_MERGES = 49152 - 256 - 2


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise MuralistError("the 'openai-clip' package is missing: pip install openai-clip==1.0.1")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise MuralistError(f"CLIP vocabulary not found at {path}: reinstall openai-clip==1.0.1")
    return path


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode alphabet, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    # Order: printable bytes first, then the remapped ones (the order CLIP's vocabulary uses).
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


@functools.cache
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is a version header
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise MuralistError(f"unexpected CLIP vocabulary size {len(vocab)}; reinstall openai-clip==1.0.1")
    return vocab, merges


@functools.cache
def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIP tokenizer padding with ``pad_token`` ("<|endoftext|>" for SD1/SDXL-L, "!" for SD2/SDXL-G).

    Cached: tokenizers are read-only after construction and safe to share between jobs.
    """
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token, model_max_length=77)
