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
"""

from __future__ import annotations

import json
import math
import os
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from flexiedge.errors import FlexiEdgeError


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens only
    text: str


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
             tokenizer: bool = True) -> "OrtModel":
        folder = Path(folder)
        config_path = folder / "genai_config.json"
        if not config_path.is_file():
            raise FlexiEdgeError(f"{folder} has no genai_config.json: export it with `flexiedge export onnx`")
        config = json.loads(config_path.read_text())
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(folder / config["model"]["decoder"]["filename"]), options,
                                       providers=["CPUExecutionProvider"])
        tok = None
        if tokenizer:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(session, config, tok)

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
        rng = np.random.default_rng(seed)
        logits, past = self.forward(np.asarray([ids], np.int64))
        new: list[int] = []
        text = _Streamer(self.tokenizer)
        for step in range(max_new_tokens):
            tok = pick(logits[0, -1], temperature, top_k, top_p, rng)
            if tok in stops:
                break
            new.append(tok)
            if on_token is not None:
                on_token(tok, text.push(tok))
            if step + 1 < max_new_tokens:
                logits, past = self.forward(np.asarray([[tok]], np.int64), past=past)
        return Generation(new, self.detokenize(new) if self.tokenizer is not None else "")

    # --- measuring --------------------------------------------------------------------------------

    def score(self, ids, context: int = 512, stride: int | None = None, max_tokens: int | None = None):
        """Perplexity over sliding windows, exactly as `flexiedge.evaluate.perplexity` scores."""
        from flexiedge.evaluate import PerplexityResult, sliding_windows

        ids = np.asarray(ids, np.int64).reshape(-1)
        stride = stride or context
        if max_tokens is not None:
            ids = ids[: max_tokens + 1]
        nll, count = 0.0, 0
        for begin, end, first in sliding_windows(len(ids), context, stride):
            logits = self.forward(ids[None, begin:end])[0][0].astype(np.float64)
            pred = logits[first - begin - 1:end - begin - 1]
            log_z = np.log(np.exp(pred - pred.max(-1, keepdims=True)).sum(-1)) + pred.max(-1)
            nll += float((log_z - pred[np.arange(len(pred)), ids[first:end]]).sum())
            count += end - first
        mean = nll / count
        return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, context=context, stride=stride)

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


class _Streamer:
    """Text of each new token, decoded so that multi-byte characters split across tokens come out whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


def pick(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Greedy argmax, or a sample from softmax(logits / T) restricted to top-k and the top-p nucleus."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64)
    order = np.argsort(-logits)[:top_k] if top_k > 0 else np.argsort(-logits)
    p = np.exp((logits[order] - logits[order[0]]) / temperature)
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1  # smallest prefix with mass >= top_p
    p = p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(p), p=p)])
