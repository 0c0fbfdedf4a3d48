"""llama.cpp runtime: load a (FlexiGPT) GGUF plus optional LoRA adapters, score, generate, time.

Uses llama-cpp-python's low-level bindings, not `llama_cpp.Llama`: its `lora_path=` silently turns
mmap off, and mmap is what lets a slot's aliased weights share their base block's pages.
Needs the patched build (`python -m flexiedge.runtimes.llamacpp.build`) for files with aliases or
output norms; stock llama.cpp files load as usual.

    m = LlamaCppModel.load("model.gguf", adapters_gguf="slots.gguf", n_threads=2)
    m.logits([1, 15, 27])                      # (3, n_vocab) float32
    m.generate("Once upon a time", 32, on_token=lambda i, s: print(s, end=""))
    m.time(prompt_tokens=128, gen_tokens=128)  # {'ttft_s': ..., 'prefill_tps': ..., 'decode_tps': ...}
    m.score(ids, context=512)                  # perplexity, as flexiedge.evaluate.perplexity scores
    LlamaCppDecoder(m)                         # start/extend/length/crop for runtimes.speculative
"""
from __future__ import annotations

import codecs
import ctypes
import os
import sys
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import llama_cpp as lc

from flexiedge.errors import FlexiEdgeError
from flexiedge.runtimes.sampling import Generation, sample_tokens
from .build import runtime_status

KV_TYPES = {"f32": lc.GGML_TYPE_F32, "f16": lc.GGML_TYPE_F16}  # KV-cache precision; f32 for parity tests
_log = dict(verbose=False, shown=False, ready=False)


@lc.llama_log_callback
def _log_callback(level: int, text: bytes, user_data) -> None:
    # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line. llama-cpp-python's own
    # callback maps an older numbering (it shows info as warnings), so we install ours: warnings and errors.
    show = _log["verbose"] or level in (3, 4) or (level == 5 and _log["shown"])
    if level != 5:
        _log["shown"] = show
    if show:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def _init_backend(verbose: bool) -> None:
    _log["verbose"] = verbose
    if not _log["ready"]:
        lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _log["ready"] = True


class LlamaCppModel:
    """One model, one context (a single sequence), adapters applied at scale 1 (scales live in B)."""

    def __init__(self, model, ctx, vocab, adapter, n_batch: int) -> None:
        self._model, self._ctx, self._vocab, self._adapter = model, ctx, vocab, adapter
        self.n_batch = n_batch
        self.n_vocab = lc.llama_vocab_n_tokens(vocab)
        self.n_ctx = lc.llama_n_ctx(ctx)

    @classmethod
    def load(cls, model_gguf: str | os.PathLike, adapters_gguf: str | os.PathLike | None = None,
             n_threads: int | None = None, n_ctx: int = 2048, n_batch: int = 512,
             kv_type: str = "f16", flash_attn: bool | None = None, repack: bool = False,
             verbose: bool = False) -> "LlamaCppModel":
        """Load with mmap on (shared weights resident once) and the adapters at scale 1.

        kv_type "f32" and flash_attn=False give float32-exact scoring (CPU flash attention rounds via f16);
        flash_attn=None lets llama.cpp choose. repack=True lets ggml copy weights into CPU-optimised
        layouts (faster for some quantised types), but it copies each aliased tensor: no more sharing.
        """
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        for path in (model_gguf, adapters_gguf):
            if path is not None and not Path(path).is_file():
                raise FlexiEdgeError(f"{path} does not exist")
        _init_backend(verbose)
        model = _load_model(model_gguf, repack)
        try:
            ctx = _new_context(model, n_ctx, n_batch, n_threads or os.cpu_count() or 1, kv_type, flash_attn)
        except FlexiEdgeError:
            lc.llama_model_free(model)
            raise
        self = cls(model, ctx, lc.llama_model_get_vocab(model), None, min(n_batch, n_ctx))
        if adapters_gguf is not None:
            self._adapter = lc.llama_adapter_lora_init(model, str(adapters_gguf).encode())
            if not self._adapter or lc.llama_set_adapters_lora(
                    ctx, (lc.llama_adapter_lora_p_ctypes * 1)(self._adapter), 1, (ctypes.c_float * 1)(1.0)) != 0:
                self.close()
                raise FlexiEdgeError(f"llama.cpp could not apply LoRA adapters {adapters_gguf}: see its error above")
        return self

    def close(self) -> None:
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._adapter:
            lc.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- vocabulary ---------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode()
        buf = (lc.llama_token * (len(data) + 8))()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, len(buf), add_bos, False)
        if n < 0:
            raise RuntimeError(f"tokenize needs {-n} tokens, buffer had {len(buf)}")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # piece longer than the buffer: -n is the size it needs
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    @property
    def size_bytes(self) -> int:
        """Weight bytes as llama.cpp counts them (aliased data counted once by the patched build)."""
        return lc.llama_model_size(self._model)

    # --- running --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the sequence (clear the KV cache)."""
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)

    def _decode(self, tokens: Sequence[int], pos0: int, all_logits: bool) -> np.ndarray | None:
        """Feed tokens at positions pos0.. in n_batch chunks; return (T, vocab) logits if all_logits."""
        out = []
        for s in range(0, len(tokens), self.n_batch):
            chunk = tokens[s:s + self.n_batch]
            batch = lc.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, t in enumerate(chunk):
                    batch.token[i], batch.pos[i] = t, pos0 + s + i
                    batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                    batch.logits[i] = all_logits or (s + i == len(tokens) - 1)
                batch.n_tokens = len(chunk)
                if lc.llama_decode(self._ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed at positions {pos0 + s}..{pos0 + s + len(chunk) - 1}")
            finally:
                lc.llama_batch_free(batch)
            if all_logits:
                ptr = lc.llama_get_logits(self._ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab)).copy())
        return np.concatenate(out) if all_logits else None

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,)).copy()

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of a fresh sequence: (T, n_vocab) float32."""
        if len(token_ids) > self.n_ctx:
            raise ValueError(f"{len(token_ids)} tokens do not fit n_ctx={self.n_ctx}")
        self.reset()
        return self._decode(list(token_ids), 0, all_logits=True)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int, str], None] | None = None, stop_at_eos: bool = True,
                 stop_tokens: Sequence[int] = ()) -> Generation:
        """Greedy when temperature == 0, else sample (top-k / top-p); on_token(id, text) streams."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt {len(ids)} + {max_new_tokens} new tokens exceed n_ctx={self.n_ctx}")
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a piece may end mid-character
        self.reset()
        self._decode(ids, 0, all_logits=False)

        def advance(tok: int, step: int) -> np.ndarray:
            self._decode([tok], len(ids) + step, all_logits=False)
            return self._last_logits()

        new = sample_tokens(self._last_logits(), advance, max_new_tokens, temperature, top_k, top_p, seed,
                            is_stop=lambda tok: tok in stop_tokens or (stop_at_eos and lc.llama_vocab_is_eog(self._vocab, tok)),
                            on_token=None if on_token is None else lambda tok: on_token(tok, utf8.decode(self.piece(tok))))
        return Generation(new, self.detokenize(new))

    def score(self, ids: Sequence[int], context: int = 512, stride: int | None = None,
              max_tokens: int | None = None):
        """Perplexity over sliding windows, exactly as `flexiedge.evaluate.perplexity` scores."""
        from flexiedge.evaluate import perplexity_of_logits
        return perplexity_of_logits(lambda window: self.logits(window.tolist()), ids, context, stride, max_tokens)

    def time(self, prompt_tokens: int = 128, gen_tokens: int = 128) -> dict[str, float]:
        """Greedy-decode timing on a synthetic prompt: time to first token, prefill and decode tokens/s."""
        rng = np.random.default_rng(0)
        ids = [int(t) for t in rng.integers(min(300, self.n_vocab // 2), self.n_vocab, prompt_tokens)]
        self.reset()
        t0 = _time.perf_counter()
        self._decode(ids, 0, all_logits=False)
        tok = int(np.argmax(self._last_logits()))
        t1 = _time.perf_counter()
        for step in range(gen_tokens):  # ignore end-of-sequence: we time a fixed number of steps
            self._decode([tok], prompt_tokens + step, all_logits=False)
            tok = int(np.argmax(self._last_logits()))
        t2 = _time.perf_counter()
        return dict(ttft_s=t1 - t0, prefill_tps=prompt_tokens / (t1 - t0), decode_tps=gen_tokens / (t2 - t1))


def _load_model(path, repack: bool):
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.load_mode = lc.LLAMA_LOAD_MODE_MMAP
    mp.use_extra_bufts = repack
    model = lc.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        status = runtime_status()  # aliases and output norms need the patched build
        raise FlexiEdgeError(f"llama.cpp could not load {path}: " + ("see its error above" if status.ok else status.reason))
    return model


def _new_context(model, n_ctx: int, n_batch: int, n_threads: int, kv_type: str, flash_attn: bool | None):
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, min(n_batch, n_ctx), min(n_batch, n_ctx)
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.type_k = cp.type_v = KV_TYPES[kv_type]
    cp.flash_attn_type = {None: lc.LLAMA_FLASH_ATTN_TYPE_AUTO, True: lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                          False: lc.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
    cp.no_perf = True
    ctx = lc.llama_init_from_model(model, cp)
    if not ctx:
        raise FlexiEdgeError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch})")
    return ctx



@dataclass
class LlamaCppDecoder:
    """The decoder interface of `runtimes.speculative` (start / extend / length / crop) over one model.

    The model has a single sequence, so one decoder per model; logits come back as torch tensors.
    """
    model: LlamaCppModel

    def start(self) -> list[int]:
        self.model.reset()
        return [0]  # the cache "handle": how many positions the context holds

    def extend(self, cache: list[int], tokens: list[int]):
        import torch
        logits = self.model._decode(list(tokens), cache[0], all_logits=True)
        cache[0] += len(tokens)
        return torch.from_numpy(logits)

    @staticmethod
    def length(cache: list[int]) -> int:
        return cache[0]

    def crop(self, cache: list[int], length: int) -> None:
        """Forget every cached position from `length` on."""
        if length < cache[0]:
            lc.llama_memory_seq_rm(lc.llama_get_memory(self.model._ctx), 0, length, -1)
            cache[0] = length
