"""Low-level GGUF writing helpers: tensor aliases (shared weights stored once), Q/K layout, LoRA adapters.

A FlexiGPT slot shares the weights of its base block. In GGUF we store those bytes once and give the
slot's tensors ("blk.N.attn_q.weight", ...) tensor-info entries whose data offset points at the base
block's data: an *alias*. Stock llama.cpp rejects such files; the patched runtime in
`runtimes/llamacpp/` accepts them and memory-maps the shared bytes once.

gguf-py (0.19) always lays tensors out back to back, so `AliasingGGUFWriter` overrides the two
steps that assign offsets and write data; everything else (header, key/values, states) is gguf-py's.

    w = AliasingGGUFWriter(path, "llama")
    w.add_tensor("blk.1.attn_q.weight", wq)
    w.add_alias("blk.2.attn_q.weight", "blk.1.attn_q.weight")   # no bytes written for layer 2
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import gguf
from gguf.gguf_writer import TensorInfo, WriterState


class AliasingGGUFWriter(gguf.GGUFWriter):
    """A GGUFWriter whose tensors may share the data of an earlier tensor (single file, in-memory tensors)."""

    def __init__(self, path: str | Path, arch: str) -> None:
        super().__init__(path, arch)  # no temp file, no splits: aliases must resolve within one data section
        self.alias_of: dict[str, str] = {}  # alias name -> name of the tensor that owns the bytes

    def add_alias(self, name: str, target: str) -> None:
        """Declare tensor `name` with the shape, type and bytes of the earlier tensor `target`."""
        if self.state is not WriterState.NO_FILE:
            raise ValueError(f"Expected output file to be not yet opened, got {self.state}")
        tensors = self.tensors[-1]
        if name in tensors:
            raise ValueError(f"Duplicated tensor name {name!r}")
        target = self.alias_of.get(target, target)  # an alias of an alias points at the owner
        if target not in tensors:
            raise ValueError(f"Alias {name!r} needs target {target!r} to be added first")
        ti = tensors[target]
        # the reader requires an alias to come after its owner: its offset lies inside the data seen so far
        tensors[name] = TensorInfo(shape=ti.shape, dtype=ti.dtype, nbytes=ti.nbytes)
        self.alias_of[name] = target

    def offsets(self) -> dict[str, int]:
        """Data-section offset of every tensor: owners back to back (aligned), aliases at their owner's."""
        offs: dict[str, int] = {}
        end = 0
        for name, ti in self.tensors[-1].items():
            if name in self.alias_of:
                offs[name] = offs[self.alias_of[name]]
            else:
                offs[name] = end
                end += self.ggml_pad(ti.nbytes, self.data_alignment)
        return offs

    def write_ti_data_to_file(self) -> None:
        if self.state is not WriterState.KV_DATA:
            raise ValueError(f"Expected output file to contain KV data, got {self.state}")
        if len(self.tensors) != 1 or self.temp_file is not None:
            raise ValueError("AliasingGGUFWriter writes a single file with in-memory tensors")
        assert self.fout is not None
        offs = self.offsets()
        ti_data = bytearray()
        for name, ti in self.tensors[0].items():  # same record layout as gguf-py's writer
            ti_data += self._pack_val(name, gguf.GGUFValueType.STRING, add_vtype=False)
            ti_data += self._pack("I", len(ti.shape))
            for dim in reversed(ti.shape):  # GGUF stores ne[0] (the fastest dimension) first
                ti_data += self._pack("Q", dim)
            ti_data += self._pack("I", ti.dtype)
            ti_data += self._pack("Q", offs[name])
        self.fout[0].write(ti_data)
        self.fout[0].flush()
        self.state = WriterState.TI_DATA

    def write_tensors_to_file(self, *, progress: bool = False) -> None:
        self.write_ti_data_to_file()
        assert self.fout is not None
        fout = self.fout[0]
        self.write_padding(fout, fout.tell())
        for name, ti in self.tensors[0].items():
            if name in self.alias_of:
                continue  # bytes already written by the owner
            assert ti.tensor is not None and ti.tensor.nbytes == ti.nbytes
            ti.tensor.tofile(fout)
            self.write_padding(fout, ti.nbytes)
            ti.tensor = None
        self.flush()
        self.state = WriterState.WEIGHTS

    def write(self) -> None:
        """Write header, key/values, tensor infos and data, then close."""
        self.write_header_to_file()
        self.write_kv_data_to_file()
        self.write_tensors_to_file()
        self.close()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of an HF q/k projection (or LoRA B) from rotate-half RoPE to GGUF's interleaved pairs.

    HF rotates dims (i, i + d/2) of each head; llama.cpp's `llama` arch rotates (2i, 2i + 1). Same as
    convert_hf_to_gguf.py's LlamaModel.permute. Pass n_head_kv for k.
    """
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Encoder = Callable[[np.ndarray], "tuple[np.ndarray, gguf.GGMLQuantizationType]"]


def write_lora_adapter(path: str | Path, arch: str, pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                       alpha: float | None = None, encode: Encoder | None = None) -> None:
    """Write a llama.cpp LoRA adapter: pairs maps a base tensor name to (A (r, in), B (out, r)).

    llama.cpp adds scale * B @ (A @ x) with scale = alpha / rank (or 1 when alpha is 0); we fold any
    per-slot scale into B and default alpha to the rank so that scale is exactly 1.
    `encode(array) -> (data, ggml type)` stores the factors in another type (default: float32).
    """
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if alpha is None:
        if len(ranks) != 1:
            raise ValueError(f"pass alpha explicitly: adapter has several ranks {sorted(ranks)}")
        alpha = float(ranks.pop())
    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, (a, b) in pairs.items():
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{name}: A is {a.shape} and B is {b.shape}; expected A (r, in), B (out, r)")
        for suffix, t in (("lora_a", a), ("lora_b", b)):
            t = np.ascontiguousarray(t, dtype=np.float32)
            if encode is None:
                w.add_tensor(f"{name}.{suffix}", t)
            else:
                data, qtype = encode(t)
                w.add_tensor(f"{name}.{suffix}", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
