"""onnxruntime runtime: load an exported folder (model.onnx + genai_config.json + tokenizer), then
forward with a KV cache, generate (stream), score (perplexity) and time (TTFT, prefill, decode).

    m = OrtModel.load("exports/smollm2-30-onnx", threads=2)
    m.logits([1, 15, 27])                      # (3, vocab) float32
    m.generate("Once upon a time", 32, on_token=lambda i, s: print(s, end=""))
    m.score(ids, context=512)                  # PerplexityResult
    m.time(prompt_tokens=128, gen_tokens=128)  # {'ttft_s': ..., 'prefill_tps': ..., 'decode_tps': ...}

The same interface as `flexiedge.runtimes.llamacpp.LlamaCppModel`. Graph optimisation happens here, at
session creation: it does not re-duplicate shared weights, whereas an optimised file would be shipped
with fusions that copy them per slot.

Self-speculative decoding (an export with --draft): `load_pair` opens model.onnx and draft.onnx with
every weight they share mapped ONCE from model.onnx.data and handed to both sessions
(`SessionOptions.add_initializer`), and `OrtDecoder` gives each the decoder interface of
`flexiedge.runtimes.speculative`:

    full, draft = load_pair("exports/smollm2-30-onnx")
    tokens, stats = speculative_generate(OrtDecoder(full), OrtDecoder(draft), prompt, 64, k=3)
"""

from __future__ import annotations

import json
import os
import time as _time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from flexiedge.errors import FlexiEdgeError
from flexiedge.runtimes.sampling import Generation, sample_tokens


class OrtModel:
    """One InferenceSession over the merged decoder graph; the KV cache lives in numpy arrays."""

    def __init__(self, session: ort.InferenceSession, config: dict, tokenizer=None):
        self.session, self.config, self.tokenizer = session, config, tokenizer
        decoder = config["model"]["decoder"]
        self.num_layers = decoder["num_hidden_layers"]
        self.kv_heads, self.head_size = decoder["num_key_value_heads"], decoder["head_size"]
        self.n_vocab = config["model"]["vocab_size"]
        self.n_ctx = config["model"]["context_length"]
        eos = config["model"]["eos_token_id"]
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self._names = decoder["inputs"], decoder["outputs"]
        self._input_names = {i.name for i in session.get_inputs()}
        self._kv_dtype = np.float16 if "float16" in session.get_inputs()[-1].type else np.float32

    @classmethod
    def load(cls, folder: str | os.PathLike, threads: int | None = None, optimize: bool = True,
             tokenizer: bool = True, draft: bool = False, initializers: dict[str, ort.OrtValue] | None = None,
             prepack: bool = True, fold_constants: bool = True) -> "OrtModel":
        """`draft`: the self-speculative draft (draft.onnx) instead of the full model. `initializers`:
        name -> OrtValue used instead of the file's tensors (see `load_pair`); ORT reads them in place.
        `prepack=False` keeps ORT from packing MatMul weights into per-session copies; `fold_constants=False`
        from folding ops on weights into per-session copies (e.g. a tied embedding's transpose for lm_head)."""
        folder = Path(folder)
        config_path = folder / ("draft_genai_config.json" if draft else "genai_config.json")
        if not config_path.is_file():
            raise FlexiEdgeError(f"{folder} has no {config_path.name}: export it with `flexiedge export onnx`"
                                 + (" --draft" if draft else ""))
        config = json.loads(config_path.read_text())
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in (initializers or {}).items():
            options.add_initializer(name, value)
        session = ort.InferenceSession(str(folder / config["model"]["decoder"]["filename"]), options,
                                       providers=["CPUExecutionProvider"],
                                       disabled_optimizers=None if fold_constants else ["ConstantFolding"])
        tok = None
        if tokenizer:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = cls(session, config, tok)
        model._initializers = initializers  # ORT reads them in place: keep them alive with the session
        return model

    # --- one step -----------------------------------------------------------------------------

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_size), self._kv_dtype)
                for _ in range(2 * self.num_layers)]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (B, T, vocab) and the new cache for `input_ids` (B, T) after `past`.

        `attention_mask` covers past and new tokens (B, P + T), 0 on left padding; positions follow
        from it, as in transformers' generate.
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = past if past is not None else self.empty_cache(batch)
        total = past[0].shape[2] + seq
        mask = np.ones((batch, total), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -seq:]
        inputs, outputs = self._names
        feed = {inputs["input_ids"]: input_ids, inputs["attention_mask"]: mask}
        if inputs.get("position_ids") in self._input_names:
            feed[inputs["position_ids"]] = positions
        for i in range(self.num_layers):
            feed[inputs["past_key_names"] % i] = past[2 * i]
            feed[inputs["past_value_names"] % i] = past[2 * i + 1]
        result = self.session.run(None, feed)
        return result[0], result[1:]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of a fresh sequence: (T, n_vocab) float32."""
        return self.forward(np.asarray([token_ids], np.int64))[0][0]

    # --- text -----------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int, str], None] | None = None, stop_at_eos: bool = True,
                 stop_tokens: Sequence[int] = ()) -> Generation:
        """Greedy when temperature == 0, else sample (top-k / top-p); on_token(id, text) streams."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt {len(ids)} + {max_new_tokens} new tokens exceed context {self.n_ctx}")
        stops = set(stop_tokens) | (self.eos_ids if stop_at_eos else set())
        logits, past = self.forward(np.asarray([ids], np.int64))
        text = _Streamer(self.tokenizer)

        def advance(tok: int, step: int) -> np.ndarray:
            nonlocal past
            logits, past = self.forward(np.asarray([[tok]], np.int64), past=past)
            return logits[0, -1]

        new = sample_tokens(logits[0, -1], advance, max_new_tokens, temperature, top_k, top_p, seed,
                            is_stop=stops.__contains__,
                            on_token=None if on_token is None else lambda tok: on_token(tok, text.push(tok)))
        return Generation(new, self.detokenize(new) if self.tokenizer is not None else "")

    # --- measuring --------------------------------------------------------------------------------

    def score(self, ids, context: int = 512, stride: int | None = None, max_tokens: int | None = None):
        """Perplexity over sliding windows, exactly as `flexiedge.evaluate.perplexity` scores."""
        from flexiedge.evaluate import perplexity_of_logits
        return perplexity_of_logits(lambda window: self.forward(window[None])[0][0], ids, context, stride, max_tokens)

    def time(self, prompt_tokens: int = 128, gen_tokens: int = 128) -> dict[str, float]:
        """Greedy-decode timing on a synthetic prompt: time to first token, prefill and decode tokens/s."""
        rng = np.random.default_rng(0)
        ids = rng.integers(min(300, self.n_vocab // 2), self.n_vocab, (1, prompt_tokens))
        t0 = _time.perf_counter()
        logits, past = self.forward(ids)
        tok = int(np.argmax(logits[0, -1]))
        t1 = _time.perf_counter()
        for _ in range(gen_tokens):  # ignore end-of-sequence: we time a fixed number of steps
            logits, past = self.forward(np.asarray([[tok]], np.int64), past=past)
            tok = int(np.argmax(logits[0, -1]))
        t2 = _time.perf_counter()
        return dict(ttft_s=t1 - t0, prefill_tps=prompt_tokens / (t1 - t0), decode_tps=gen_tokens / (t2 - t1))


# --- self-speculative decoding: two sessions over one copy of the weights ------------------------


def _external_tensors(path: Path) -> dict[str, tuple[str, int, int, int, tuple[int, ...]]]:
    import onnx
    proto = onnx.load_model(path, load_external_data=False)
    found = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            found[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]), t.data_type,
                             tuple(t.dims))
    return found


def shared_initializers(folder: str | os.PathLike) -> dict[str, ort.OrtValue]:
    """One OrtValue per weight that draft.onnx reads from model.onnx.data (same name, same bytes in both
    graphs), each a view of ONE read-only np.memmap of that file: the page cache holds the bytes once, and
    both sessions compute from them in place."""
    import onnx

    folder = Path(folder)
    full, draft = _external_tensors(folder / "model.onnx"), _external_tensors(folder / "draft.onnx")
    data_file = folder / "model.onnx.data"
    mapped = np.memmap(data_file, dtype=np.uint8, mode="r")
    values = {}
    for name, where in draft.items():
        if full.get(name) != where or where[0] != data_file.name:
            continue
        _, offset, length, data_type, dims = where
        dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
        if dtype.itemsize * int(np.prod(dims, dtype=np.int64)) != length or offset % dtype.itemsize:
            continue  # packed sub-byte types or unaligned data: leave them to each session
        array = mapped[offset:offset + length].view(dtype).reshape(dims)
        values[name] = ort.OrtValue.ortvalue_from_numpy(array)
    return values


def load_pair(folder: str | os.PathLike, threads: int | None = None, optimize: bool = True, tokenizer: bool = True,
              share: bool = True, prepack: bool = False) -> tuple[OrtModel, OrtModel]:
    """(full, draft) sessions of an export with --draft. `share`: every weight the draft reads is one
    memory-mapped buffer given to both sessions, and the sessions make no private copies of it: ORT's CPU
    MatMul would pre-pack each constant weight into a private buffer per session (the shared container for
    pre-packed weights is in ORT's C API, not its Python API), and constant folding would materialise a
    tied embedding's transpose (lm_head) per session; sharing turns both off (pre-packing unless
    `prepack`). Without `share`, each session loads (and pre-packs) its own copy."""
    values = shared_initializers(folder) if share else None
    options = dict(initializers=values, prepack=prepack or not share, fold_constants=not share)
    full = OrtModel.load(folder, threads, optimize, tokenizer, **options)
    draft = OrtModel.load(folder, threads, optimize, False, draft=True, **options)
    draft.tokenizer = full.tokenizer
    return full, draft


class OrtCache:
    """The KV cache of one sequence (batch 1) for `OrtDecoder`: numpy arrays (1, kv_heads, length, head)."""

    def __init__(self, past: list[np.ndarray]):
        self.past = past


class OrtDecoder:
    """The decoder interface of `flexiedge.runtimes.speculative` over an `OrtModel` (full or draft)."""

    def __init__(self, model: OrtModel):
        self.model = model

    def start(self) -> OrtCache:
        return OrtCache(self.model.empty_cache(1))

    def extend(self, cache: OrtCache, tokens: list[int]):
        import torch
        logits, cache.past = self.model.forward(np.asarray([tokens], np.int64), past=cache.past)
        return torch.from_numpy(np.ascontiguousarray(logits[0], dtype=np.float32))

    @staticmethod
    def length(cache: OrtCache) -> int:
        return cache.past[0].shape[2]

    @staticmethod
    def crop(cache: OrtCache, length: int) -> None:
        """Forget every cached position from `length` on."""
        if length < cache.past[0].shape[2]:
            cache.past = [np.ascontiguousarray(a[:, :, :length]) for a in cache.past]


class _Streamer:
    """Text of each new token, decoded so that multi-byte characters split across tokens come out whole.

    Each step decodes only the tokens since the last emitted piece plus the one before them (which keeps
    a tokenizer's leading-space rules right), not the whole generation: constant work per token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read]: context already shown; ids[read:]: not shown yet

    def push(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        shown, text = decode(self.ids[self.prefix:self.read]), decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(shown):  # an incomplete character: wait for more
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]
