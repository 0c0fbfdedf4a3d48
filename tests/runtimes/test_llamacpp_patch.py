"""The llama.cpp patch: aliased GGUF tensors, per-layer output norms and per-layer LoRA, checked on real
llama.cpp against an independent torch reference forward (HF layout: rotate-half RoPE, GQA, SwiGLU).

Needs the patched runtime (python -m flexiedge.runtimes.llamacpp.build); skipped when it is missing.
The tiny model is written in the test: 4 layers, where layer 2 is a FlexiGPT slot whose seven
projections alias layer 1's bytes and which has its own RMSNorms, output norms and LoRA adapters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from flexiedge.exporters.gguf_writer import AliasingGGUFWriter, permute_qk, write_lora_adapter
from flexiedge.runtimes.llamacpp.build import runtime_status

_status = runtime_status()
pytestmark = pytest.mark.skipif(not _status.ok, reason=_status.reason)

PROJ = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


@dataclass
class Tiny:
    n_vocab: int = 300  # 3 specials + 256 byte tokens + 41 words
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2  # GQA: two query heads per key/value head
    n_ff: int = 128
    n_layer: int = 4
    rms_eps: float = 1e-5
    ln_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def shapes(self) -> dict[str, tuple[int, int]]:  # HF (out, in) of each projection
        d, kv, f = self.n_embd, self.n_head_kv * self.head_dim, self.n_ff
        return dict(attn_q=(d, d), attn_k=(kv, d), attn_v=(kv, d), attn_output=(d, d),
                    ffn_gate=(f, d), ffn_up=(f, d), ffn_down=(d, f))


def random_weights(cfg: Tiny, seed: int = 0, shared: dict[int, int] | None = None,
                   post_norm_layers: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """HF-layout float32 weights named like GGUF. shared maps slot layer -> base layer (same projections)."""
    rng = np.random.default_rng(seed)
    def lin(o, i): return (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)
    def gain(n): return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    w = {"token_embd.weight": rng.standard_normal((cfg.n_vocab, cfg.n_embd)).astype(np.float32)}
    for il in range(cfg.n_layer):
        w[f"blk.{il}.attn_norm.weight"] = gain(cfg.n_embd)
        w[f"blk.{il}.ffn_norm.weight"] = gain(cfg.n_embd)
        for p, (o, i) in cfg.shapes().items():
            w[f"blk.{il}.{p}.weight"] = lin(o, i)
        if il in post_norm_layers:
            w[f"blk.{il}.post_attention_norm.weight"] = (0.3 * gain(cfg.n_embd))
            w[f"blk.{il}.post_ffw_norm.weight"] = (0.3 * gain(cfg.n_embd))
    for slot, base in (shared or {}).items():
        for p in PROJ:
            w[f"blk.{slot}.{p}.weight"] = w[f"blk.{base}.{p}.weight"]
    w["output_norm.weight"] = gain(cfg.n_embd)
    w["output.weight"] = lin(cfg.n_vocab, cfg.n_embd)
    return w


def write_tiny_gguf(path: Path, cfg: Tiny, w: dict[str, np.ndarray], shared: dict[int, int] | None = None,
                    writer=AliasingGGUFWriter) -> Path:
    """Write a `llama` GGUF; with shared={slot: base}, the slot's projections alias the base's bytes."""
    wr = writer(path, "llama")
    wr.add_context_length(128)
    wr.add_embedding_length(cfg.n_embd)
    wr.add_block_count(cfg.n_layer)
    wr.add_feed_forward_length(cfg.n_ff)
    wr.add_head_count(cfg.n_head)
    wr.add_head_count_kv(cfg.n_head_kv)
    wr.add_layer_norm_rms_eps(cfg.rms_eps)
    wr.add_layer_norm_eps(cfg.ln_eps)  # eps of the output norms
    wr.add_rope_freq_base(cfg.rope_base)
    wr.add_rope_dimension_count(cfg.head_dim)
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(cfg.n_vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (cfg.n_vocab - 259)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores([0.0] * 259 + [-float(i) for i in range(cfg.n_vocab - 259)])
    wr.add_token_types(types)
    wr.add_unk_token_id(0), wr.add_bos_token_id(1), wr.add_eos_token_id(2)
    aliases = {f"blk.{s}.{p}.weight": f"blk.{b}.{p}.weight" for s, b in (shared or {}).items() for p in PROJ}
    for name, t in w.items():
        if name in aliases:
            wr.add_alias(name, aliases[name])
        else:
            wr.add_tensor(name, to_gguf(cfg, name, t))
    wr.write()
    return path


def to_gguf(cfg: Tiny, name: str, t: np.ndarray) -> np.ndarray:
    """HF rotate-half rows of q/k (and their LoRA B) -> llama.cpp's interleaved RoPE pairs."""
    if ".attn_q." in name:
        return permute_qk(t, cfg.n_head)
    if ".attn_k." in name:
        return permute_qk(t, cfg.n_head_kv)
    return t


def random_lora(cfg: Tiny, layer: int, rank: int = 4, seed: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HF-layout (A (r, in), B (out, r)) for all seven projections of one layer, scale folded into B."""
    rng = np.random.default_rng(seed)
    return {f"blk.{layer}.{p}.weight": ((rng.standard_normal((rank, i)) / math.sqrt(i)).astype(np.float32),
                                        (0.5 * rng.standard_normal((o, rank)) / math.sqrt(rank)).astype(np.float32))
            for p, (o, i) in cfg.shapes().items()}


def write_tiny_lora(path: Path, cfg: Tiny, lora) -> Path:
    write_lora_adapter(path, "llama", {n: (a, to_gguf(cfg, n, b)) for n, (a, b) in lora.items()})
    return path


# --- independent reference: the HF LLaMA forward in float64 --------------------------------------------

def reference_logits(cfg: Tiny, w: dict[str, np.ndarray], ids: list[int], lora=None) -> np.ndarray:
    t = {k: torch.from_numpy(v).double() for k, v in w.items()}
    ab = {k: (torch.from_numpy(a).double(), torch.from_numpy(b).double()) for k, (a, b) in (lora or {}).items()}

    def linear(x, name):
        y = x @ t[name].T
        if name in ab:  # unmerged LoRA: W x + B (A x)
            y = y + (x @ ab[name][0].T) @ ab[name][1].T
        return y

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * g

    def layer_norm(x, g):  # FlexiGPT output norm: LayerNorm without bias
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.ln_eps) * g

    T, hd = len(ids), cfg.head_dim
    inv = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rope(x):  # HF rotate_half
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    h = t["token_embd.weight"][ids]
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        x = rms(h, t[p + "attn_norm.weight"])
        q = rope(linear(x, p + "attn_q.weight").view(T, cfg.n_head, hd))
        k = rope(linear(x, p + "attn_k.weight").view(T, cfg.n_head_kv, hd))
        v = linear(x, p + "attn_v.weight").view(T, cfg.n_head_kv, hd)
        rep = cfg.n_head // cfg.n_head_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # query head h uses kv head h // rep
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, cfg.n_embd)
        a = linear(o, p + "attn_output.weight")
        if p + "post_attention_norm.weight" in t:
            a = layer_norm(a, t[p + "post_attention_norm.weight"])
        h = h + a
        x = rms(h, t[p + "ffn_norm.weight"])
        f = linear(torch.nn.functional.silu(linear(x, p + "ffn_gate.weight")) * linear(x, p + "ffn_up.weight"),
                   p + "ffn_down.weight")
        if p + "post_ffw_norm.weight" in t:
            f = layer_norm(f, t[p + "post_ffw_norm.weight"])
        h = h + f
    return (rms(h, t["output_norm.weight"]) @ t["output.weight"].T).numpy()


# --- tests ----------------------------------------------------------------------------------------------

CFG = Tiny()
IDS = [1, 17, 260, 5, 299, 42, 42, 280, 3, 271, 100, 2, 290, 64, 7, 259]
SLOT = {2: 1}  # layer 2 shares layer 1's projections
TOL = dict(atol=1e-4, rtol=1e-4)  # measured max|diff| ~1e-6 on logits of magnitude ~4 (f32 KV, no flash attention)


def _logits(path, adapters=None, ids=IDS):
    from flexiedge.runtimes.llamacpp import LlamaCppModel
    # f32 KV cache and no flash attention: llama.cpp's CPU flash attention rounds through f16 (~1e-3 error)
    with LlamaCppModel.load(path, adapters_gguf=adapters, n_threads=2, n_ctx=64, kv_type="f32", flash_attn=False) as m:
        return m.logits(ids), m.size_bytes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    w = random_weights(CFG, shared=SLOT, post_norm_layers=(2,))
    plain_w = random_weights(CFG, seed=3)
    lora = random_lora(CFG, layer=2)
    return dict(
        w=w, plain_w=plain_w, lora=lora,
        aliased=write_tiny_gguf(d / "aliased.gguf", CFG, w, shared=SLOT),
        duplicated=write_tiny_gguf(d / "duplicated.gguf", CFG, w),  # same values, bytes stored twice
        plain=write_tiny_gguf(d / "plain.gguf", CFG, plain_w),  # stock llama: no aliases, no output norms
        adapter=write_tiny_lora(d / "slot2.lora.gguf", CFG, lora),
    )


def test_aliases_store_the_shared_bytes_once(files):
    shared = sum(files["w"][f"blk.1.{p}.weight"].nbytes for p in PROJ)  # all multiples of the alignment
    assert files["duplicated"].stat().st_size - files["aliased"].stat().st_size == shared
    r = gguf.GGUFReader(files["aliased"])
    t = {x.name: x for x in r.tensors}
    for p in PROJ:  # same offset, same bytes, read back through gguf-py
        assert t[f"blk.2.{p}.weight"].data_offset == t[f"blk.1.{p}.weight"].data_offset
        np.testing.assert_array_equal(t[f"blk.2.{p}.weight"].data, t[f"blk.1.{p}.weight"].data)
    assert t["blk.0.attn_q.weight"].data_offset != t["blk.1.attn_q.weight"].data_offset


def test_aliased_model_matches_reference_and_duplicated_file(files):
    ref = reference_logits(CFG, files["w"], IDS)
    got, size = _logits(files["aliased"])
    dup, dup_size = _logits(files["duplicated"])
    assert got.shape == (len(IDS), CFG.n_vocab)
    np.testing.assert_allclose(got, ref, **TOL)
    np.testing.assert_array_equal(got, dup)  # aliasing changes storage, never values
    shared = sum(files["w"][f"blk.1.{p}.weight"].nbytes for p in PROJ)
    assert dup_size - size == shared  # llama_model_size counts shared bytes once


def test_output_norms_are_applied(files):
    w = dict(files["w"])
    del w["blk.2.post_attention_norm.weight"], w["blk.2.post_ffw_norm.weight"]
    ref_without = reference_logits(CFG, w, IDS)
    got, _ = _logits(files["aliased"])
    assert np.abs(got - ref_without).max() > 0.1  # the norms matter, so the parity above tests them


def test_stock_llama_file_unchanged(files):
    """No aliases, no output norms: the patched runtime computes the plain LLaMA forward."""
    got, size = _logits(files["plain"])
    np.testing.assert_allclose(got, reference_logits(CFG, files["plain_w"], IDS), **TOL)
    assert size == sum(v.nbytes for v in files["plain_w"].values())


def test_lora_applies_to_its_layer_only(files):
    base, _ = _logits(files["aliased"])
    got, _ = _logits(files["aliased"], adapters=files["adapter"])
    ref = reference_logits(CFG, files["w"], IDS, lora=files["lora"])
    np.testing.assert_allclose(got, ref, **TOL)
    assert np.abs(got - base).max() > 0.1  # the adapter on layer 2 changes the output ...
    # ... and only through layer 2: applying layer 2's factors to layer 1 (which shares the bytes) differs
    wrong = {k.replace("blk.2.", "blk.1."): v for k, v in files["lora"].items()}
    assert np.abs(got - reference_logits(CFG, files["w"], IDS, lora=wrong)).max() > 0.1


def test_generate_and_time(files):
    from flexiedge.runtimes.llamacpp import LlamaCppModel
    with LlamaCppModel.load(files["aliased"], adapters_gguf=files["adapter"], n_threads=2, n_ctx=64) as m:
        streamed = []
        g = m.generate(IDS[:4], 8, on_token=lambda i, s: streamed.append(i), stop_at_eos=False)
        assert g.token_ids == streamed and len(g.token_ids) == 8
        full = m.logits(IDS[:4] + g.token_ids[:-1])  # greedy: each token is the argmax of the previous step
        assert list(full[3:].argmax(-1)) == g.token_ids
        s = m.generate(IDS[:4], 8, temperature=1.0, seed=0, stop_at_eos=False)
        assert len(s.token_ids) == 8
        t = m.time(prompt_tokens=16, gen_tokens=8)
        assert set(t) == {"ttft_s", "prefill_tps", "decode_tps"} and all(v > 0 for v in t.values())


class _BadAliasWriter(AliasingGGUFWriter):
    """Moves every alias's offset by `shift` bytes to write the malformed files the reader must refuse."""
    shift = 0

    def offsets(self):
        return {n: o + (self.shift if n in self.alias_of else 0) for n, o in super().offsets().items()}


@pytest.mark.parametrize("shift", [
    4,          # inside the owner's data but not aligned: neither an alias nor the next tensor's offset
    1 << 30,    # aligned but past the data section (and the file)
])
def test_malformed_alias_is_refused(tmp_path, shift):
    from flexiedge.errors import FlexiEdgeError
    bad = type("ShiftedAliasWriter", (_BadAliasWriter,), {"shift": shift})
    path = write_tiny_gguf(tmp_path / "bad.gguf", CFG, random_weights(CFG, shared=SLOT), shared=SLOT, writer=bad)
    with pytest.raises(FlexiEdgeError, match="could not load"):
        _logits(path)


def test_adapter_for_a_missing_layer_is_refused(files, tmp_path):
    from flexiedge.errors import FlexiEdgeError
    a, b = files["lora"]["blk.2.attn_q.weight"]
    bad = tmp_path / "bad.lora.gguf"
    write_lora_adapter(bad, "llama", {f"blk.{CFG.n_layer}.attn_q.weight": (a, b)})  # one layer too far
    with pytest.raises(FlexiEdgeError, match="could not apply LoRA adapters"):
        _logits(files["aliased"], adapters=bad)


def test_score_is_the_perplexity_of_the_reference(files):
    from flexiedge.evaluate import sliding_windows
    from flexiedge.runtimes.llamacpp import LlamaCppModel
    ids = (IDS * 3)[:40]
    nll = []  # the reference, window by window: each window restarts at position 0
    for begin, end, first in sliding_windows(len(ids), 16, 8):
        lp = torch.log_softmax(torch.from_numpy(reference_logits(CFG, files["w"], ids[begin:end])), -1)
        nll += [-float(lp[t - begin - 1, ids[t]]) for t in range(first, end)]
    with LlamaCppModel.load(files["aliased"], n_threads=2, n_ctx=64, kv_type="f32", flash_attn=False) as m:
        got = m.score(ids, context=16, stride=8)
    assert got.tokens == len(nll) == len(ids) - 1
    assert math.isclose(got.nll, sum(nll) / len(nll), rel_tol=1e-5)


def test_speculative_decoding_over_llamacpp_equals_greedy(files):
    from flexiedge.runtimes.llamacpp import LlamaCppDecoder, LlamaCppModel
    from flexiedge.runtimes.pytorch import greedy_generate
    from flexiedge.runtimes.speculative import speculative_generate
    kw = dict(n_threads=2, n_ctx=64, kv_type="f32", flash_attn=False)
    with LlamaCppModel.load(files["aliased"], adapters_gguf=files["adapter"], **kw) as full, \
         LlamaCppModel.load(files["plain"], **kw) as draft:  # any draft: greedy output must not change
        want = greedy_generate(LlamaCppDecoder(full), IDS[:5], 12)
        got, stats = speculative_generate(LlamaCppDecoder(full), LlamaCppDecoder(draft), IDS[:5], 12, k=3)
    assert got == want and stats.generated == 12
