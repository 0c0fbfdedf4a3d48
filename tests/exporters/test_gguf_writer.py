"""GGUF writing helpers: tensor aliases read back through gguf-py, q/k row order, LoRA adapter files.
(Loading these files in llama.cpp is tested in tests/runtimes/test_llamacpp_patch.py.)"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from flexiedge.exporters.gguf_writer import AliasingGGUFWriter, permute_qk, write_lora_adapter

rng = np.random.default_rng(0)
A = rng.standard_normal((8, 16)).astype(np.float32)   # 512 bytes: a multiple of the 32-byte alignment
B = rng.standard_normal((3, 5)).astype(np.float32)    # 60 bytes: padded to 64


def _write(path, steps):
    w = AliasingGGUFWriter(path, "llama")
    for kind, name, arg in steps:
        w.add_tensor(name, arg) if kind == "tensor" else w.add_alias(name, arg)
    w.write()
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_alias_shares_offset_and_bytes(tmp_path):
    t = _write(tmp_path / "a.gguf", [("tensor", "a", A), ("tensor", "b", B), ("alias", "a2", "a"),
                                     ("alias", "b2", "b"), ("alias", "a3", "a2")])  # alias of an alias -> owner
    assert [n for n in t] == ["a", "b", "a2", "b2", "a3"]  # infos keep the order they were added in
    for alias, owner in [("a2", "a"), ("b2", "b"), ("a3", "a")]:
        assert t[alias].data_offset == t[owner].data_offset
        np.testing.assert_array_equal(t[alias].data, t[owner].data)
    np.testing.assert_array_equal(t["b"].data, B)


def test_alias_adds_no_bytes(tmp_path):
    plain = tmp_path / "plain.gguf"
    _write(plain, [("tensor", "a", A), ("tensor", "b", B)])
    aliased = tmp_path / "aliased.gguf"
    _write(aliased, [("tensor", "a", A), ("tensor", "b", B), ("alias", "a2", "a")])
    extra_info = aliased.stat().st_size - plain.stat().st_size  # only the tensor-info record (+ padding)
    assert 0 < extra_info <= 64


@pytest.mark.parametrize("steps, error", [
    ([("alias", "x", "a")], "needs target 'a' to be added first"),           # owner must come first
    ([("tensor", "a", A), ("alias", "a", "a")], "Duplicated tensor name"),   # names stay unique
])
def test_alias_errors(tmp_path, steps, error):
    with pytest.raises(ValueError, match=error):
        _write(tmp_path / "bad.gguf", steps)


def test_alias_after_file_opened_is_refused(tmp_path):
    w = AliasingGGUFWriter(tmp_path / "x.gguf", "llama")
    w.add_tensor("a", A)
    w.write_header_to_file()
    with pytest.raises(ValueError, match="not yet opened"):
        w.add_alias("a2", "a")
    w.close()


def test_lazy_tensors_are_produced_one_at_a_time_when_written(tmp_path):
    """Infos (sizes, offsets) come from the declared shape and type; bytes only when the data section is written."""
    import weakref
    calls, made = [], []

    def producer(name, array):
        def produce():
            calls.append(name)
            assert all(ref() is None for ref in made)  # the previous tensor's bytes were released first
            data = array.copy()
            made.append(weakref.ref(data))
            return data
        return produce

    w = AliasingGGUFWriter(tmp_path / "lazy.gguf", "llama")
    q = gguf.quants.quantize(np.tile(A, (1, 2)), gguf.GGMLQuantizationType.Q8_0)  # (8, 32) -> (8, 34) bytes
    w.add_lazy_tensor("a", A.shape, gguf.GGMLQuantizationType.F32, producer("a", A))
    w.add_tensor("b", B)                                                          # in-memory and lazy mix
    w.add_lazy_tensor("q", (8, 32), gguf.GGMLQuantizationType.Q8_0, producer("q", q))
    w.add_alias("a2", "a")                                                        # aliases of lazy owners
    w.write_header_to_file()
    w.write_kv_data_to_file()
    assert calls == []
    w.write_tensors_to_file()
    assert calls == ["a", "q"]
    w.close()
    t = {x.name: x for x in gguf.GGUFReader(tmp_path / "lazy.gguf").tensors}
    np.testing.assert_array_equal(t["a"].data, A)
    np.testing.assert_array_equal(t["b"].data, B)
    assert tuple(int(d) for d in t["q"].shape) == (32, 8) and t["q"].tensor_type.name == "Q8_0"
    np.testing.assert_array_equal(t["q"].data, q)
    assert t["a2"].data_offset == t["a"].data_offset


@pytest.mark.parametrize("shape, qtype, error", [
    ((8, 100), gguf.GGMLQuantizationType.Q8_0, "not a whole number of Q8_0 blocks"),   # declared: refused early
    ((8, 64), gguf.GGMLQuantizationType.F16, "expected 1024 bytes of F16 data"),      # produced: wrong size
])
def test_lazy_tensor_size_errors(tmp_path, shape, qtype, error):
    w = AliasingGGUFWriter(tmp_path / "bad.gguf", "llama")
    with pytest.raises(ValueError, match=error):
        w.add_lazy_tensor("x", shape, qtype, lambda: A)  # A: 512 bytes of float32, (8, 16)
        w.write()


def _rope_interleaved(x, pos, base=10000.0):  # llama.cpp LLAMA_ROPE_TYPE_NORM: pairs (2i, 2i+1)
    d = x.shape[-1]
    ang = pos * base ** (-np.arange(0, d, 2) / d)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * np.cos(ang) - x1 * np.sin(ang), x0 * np.sin(ang) + x1 * np.cos(ang)
    return out


def _rope_half(x, pos, base=10000.0):  # HF rotate_half: pairs (i, i + d/2)
    d = x.shape[-1]
    ang = pos * base ** (-np.arange(0, d, 2) / d)
    c, s = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
    return x * c + np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1) * s


def test_permute_qk_maps_rotate_half_to_interleaved():
    n_head, hd, d_in = 3, 8, 5
    w, x = rng.standard_normal((n_head * hd, d_in)), rng.standard_normal(d_in)
    hf = _rope_half((w @ x).reshape(n_head, hd), pos=7)
    gg = _rope_interleaved((permute_qk(w, n_head) @ x).reshape(n_head, hd), pos=7)
    # the same rotated values, interleaved: gg[2i] = hf[i], gg[2i+1] = hf[i + d/2] (so q.k is unchanged)
    np.testing.assert_allclose(gg[:, 0::2], hf[:, : hd // 2], atol=1e-12)
    np.testing.assert_allclose(gg[:, 1::2], hf[:, hd // 2:], atol=1e-12)


def test_lora_adapter_file(tmp_path):
    a, b = rng.standard_normal((4, 16)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    path = tmp_path / "lora.gguf"
    write_lora_adapter(path, "llama", {"blk.2.attn_q.weight": (a, b)})
    r = gguf.GGUFReader(path)
    kv = {f.name: f.contents() for f in r.fields.values()}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == 4.0  # alpha = rank: llama.cpp's scale alpha / rank is 1
    t = {x.name: x for x in r.tensors}
    np.testing.assert_array_equal(t["blk.2.attn_q.weight.lora_a"].data, a)
    np.testing.assert_array_equal(t["blk.2.attn_q.weight.lora_b"].data, b)
    with pytest.raises(ValueError, match="expected A"):
        write_lora_adapter(tmp_path / "bad.gguf", "llama", {"w": (a, b.T)})
