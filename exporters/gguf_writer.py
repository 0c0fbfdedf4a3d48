"""Low-level GGUF writing helpers: tensor aliases (shared weights stored once), Q/K layout, LoRA adapters.

A FlexiGPT slot shares the weights of its base block. In GGUF we store those bytes once and give the
slot's tensors ("blk.N.attn_q.weight", ...) tensor-info entries whose data offset points at the base
block's data: an *alias*. Stock llama.cpp rejects such files; the patched runtime in
`runtimes/llamacpp/` accepts them and memory-maps the shared bytes once.

gguf-py (0.19) always lays tensors out back to back, so `AliasingGGUFWriter` overrides the two
steps that assign offsets and write data; everything else (header, key/values, states) is gguf-py's.

A model too large for memory is written from *lazy* tensors: shape and type are declared up front
(the tensor infos, which precede the data, need every size), and a callable produces the encoded
bytes when the data section reaches that tensor, so only one tensor is in memory at a time.

    w = AliasingGGUFWriter(path, "llama")
    w.add_tensor("blk.1.attn_q.weight", wq)
    w.add_lazy_tensor("blk.1.attn_k.weight", (256, 2048), Q4_K, lambda: encode_k())  # bytes made when written
    w.add_alias("blk.2.attn_q.weight", "blk.1.attn_q.weight")   # no bytes written for layer 2
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import gguf
from gguf.gguf_writer import TensorInfo, WriterState


def tensor_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of logical `shape` (numpy order: the last dimension is GGUF's ne0) in `qtype`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} are not a whole number of {qtype.name} blocks of {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


class AliasingGGUFWriter(gguf.GGUFWriter):
    """A GGUFWriter whose tensors may share the data of an earlier tensor, or be produced only when written."""

    def __init__(self, path: str | Path, arch: str) -> None:
        super().__init__(path, arch)  # no temp file, no splits: aliases must resolve within one data section
        self.alias_of: dict[str, str] = {}  # alias name -> name of the tensor that owns the bytes
        self.producers: dict[str, Callable[[], np.ndarray]] = {}  # lazy tensor name -> makes its encoded data

    def add_lazy_tensor(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType,
                        produce: Callable[[], np.ndarray]) -> None:
        """Declare tensor `name` of logical `shape` (numpy order) in `qtype`; `produce()` returns its encoded
        data (any dtype, exactly `tensor_nbytes(shape, qtype)` bytes) when write_tensors_to_file reaches it."""
        if self.state is not WriterState.NO_FILE:
            raise ValueError(f"Expected output file to be not yet opened, got {self.state}")
        tensors = self.tensors[-1]
        if name in tensors:
            raise ValueError(f"Duplicated tensor name {name!r}")
        shape = tuple(int(d) for d in shape)
        tensors[name] = TensorInfo(shape=shape, dtype=qtype, nbytes=tensor_nbytes(shape, qtype))
        self.producers[name] = produce

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
            raise ValueError("AliasingGGUFWriter writes a single file (no splits, no temp file)")
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
            data = ti.tensor if ti.tensor is not None else self.producers.pop(name)()
            if data.nbytes != ti.nbytes:
                raise ValueError(f"{name}: expected {ti.nbytes} bytes of {ti.dtype.name} data for shape "
                                 f"{ti.shape}, got {data.nbytes}")
            np.ascontiguousarray(data).tofile(fout)
            self.write_padding(fout, ti.nbytes)
            ti.tensor = data = None  # only one tensor's bytes in memory at a time
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
    w = lora_adapter_writer(path, arch, alpha)
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
    w.write()


def lora_adapter_writer(path: str | Path, arch: str, alpha: float) -> AliasingGGUFWriter:
    """A writer with the key/values of a llama.cpp LoRA adapter; add "<base tensor>.lora_a"/".lora_b" pairs
    (in memory or lazy), then call write()."""
    w = AliasingGGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    return w
