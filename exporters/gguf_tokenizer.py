"""The tokenizer of a run as GGUF metadata: GPT-2 style byte-level BPE (SmolLM2's kind) from tokenizer.json.

Laid out as llama.cpp's convert_hf_to_gguf.py does for `tokenizer.ggml.model = gpt2`: one token string per
id (ids the tokenizer lacks, up to the model's vocab size, become unused "[PAD{id}]" tokens), a token type
per id (special added tokens CONTROL, other added tokens USER_DEFINED), merges as "left right" strings,
special-token ids, and the pre-tokenizer name llama.cpp uses to pick its split regex.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from flexiedge.errors import FlexiEdgeError

# Pre-tokenizer names: llama.cpp keys its regex on tokenizer.ggml.pre. A plain byte-level BPE uses GPT-2's
# regex ("gpt-2"); SmolLM's vocabulary (its <|im_start|>/<|im_end|> specials, 49152 ids) is "smollm", which
# also splits digits one by one, as SmolLM's vocabulary has no multi-digit tokens.
SMOLLM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass
class BPEVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    chat_template: str | None = None


def bpe_vocab(folder: Path, vocab_size: int, config: dict) -> BPEVocab:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FlexiEdgeError(f"{folder} has no tokenizer.json: GGUF export needs the fast tokenizer file")
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(tok.get("pre_tokenizer")):
        raise FlexiEdgeError(f"{path}: GGUF export supports byte-level BPE tokenizers (GPT-2 style), got "
                             f"model {model.get('type')!r} with pre-tokenizer {(tok.get('pre_tokenizer') or {}).get('type')!r}")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    if max(vocab.values()) >= vocab_size:
        raise FlexiEdgeError(f"{path} has token id {max(vocab.values())}, but the model's vocab_size is {vocab_size}")
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif s in added:
            tokens.append(s)
            types.append(gguf.TokenType.CONTROL if added[s].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(s)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return BPEVocab(tokens=tokens, types=types, merges=merges, pre=_pre_name(vocab),
                    special=_special_ids(folder, config, vocab), add_bos=_adds_bos(tok, config),
                    chat_template=_chat_template(folder))


def _is_byte_level(pre: dict | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "Sequence":
        return any(_is_byte_level(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") == "ByteLevel"


def _pre_name(vocab: dict[str, int]) -> str:
    if all(vocab.get(s) == i for i, s in enumerate(SMOLLM_SPECIALS)) and len(vocab) == 49152:
        return "smollm"
    return "gpt-2"


def _special_ids(folder: Path, config: dict, vocab: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids: config.json's ids first, else the token strings in tokenizer_config.json."""
    tc_path = Path(folder) / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    out = {}
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unk"), ("pad", "pad")):
        value = config.get(f"{key}_token_id")
        if value is None:
            token = tc.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            value = vocab.get(token) if token is not None else None
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            out[gguf_key] = int(value)
    return out


def _adds_bos(tok: dict, config: dict) -> bool:
    """True when the tokenizer's post-processor puts the bos token in front of every sequence."""
    post = tok.get("post_processor") or {}
    single = post.get("single") or []
    return any("SpecialToken" in piece for piece in single[:1])


def _chat_template(folder: Path) -> str | None:
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tc = Path(folder) / "tokenizer_config.json"
    return json.loads(tc.read_text()).get("chat_template") if tc.is_file() else None
