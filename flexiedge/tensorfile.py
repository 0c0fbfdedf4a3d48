"""Safetensors files read and written one tensor at a time: no mmap, no whole-model dict.

Large models (a LLaMA-2-7B is 13.5 GB in bf16) must never sit in memory whole, and a memory-mapped
file counts every page it touched in the reader's RSS. So reads are plain `readinto` of one tensor's
bytes, and writes stream tensors into a header that is fixed up front.

    with TensorFiles.open("models/llama-7b") as src:       # one file, or an HF shard set
        w = src.get("model.layers.0.self_attn.q_proj.weight")   # torch.Tensor, its own memory
    with SafetensorsWriter(path, [(name, torch.bfloat16, shape), ...]) as out:
        out.write(name, tensor)                              # in the declared order
    out.sha256                                              # of the whole file, computed while writing

Format (https://github.com/huggingface/safetensors): u64 little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FlexiEdgeError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int   # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file (absolute offsets) and its metadata, from the header alone."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
        file_size = path.stat().st_size
    except FileNotFoundError:
        raise FlexiEdgeError(f"{path} not found: the model folder is incomplete") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise FlexiEdgeError(f"{path} is not a safetensors file ({e}): re-create or re-download it") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        dtype = DTYPES.get(entry.get("dtype"))
        begin, end = entry.get("data_offsets", (0, -1))
        if dtype is None or not 0 <= begin <= end or 8 + size + end > file_size:
            raise FlexiEdgeError(f"{path}: tensor {name} has a bad header entry or lies past the end of the "
                                 "file (truncated or corrupt): re-create or re-download it")
        tensors[name] = TensorInfo(path, dtype, tuple(entry["shape"]), 8 + size + begin, 8 + size + end)
    return tensors, metadata


class TensorFiles:
    """Read access to the tensors of a safetensors file or an HF shard set, by name."""

    def __init__(self, tensors: dict[str, TensorInfo], metadata: dict[str, str]):
        self.tensors = tensors
        self.metadata = metadata
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(cls, path: str | Path) -> "TensorFiles":
        """`path`: a .safetensors file, or a folder with model.safetensors or model.safetensors.index.json."""
        path = Path(path)
        if path.is_dir():
            if (path / INDEX).is_file():
                return cls._open_shards(path)
            path = path / SINGLE
        if not path.is_file():
            raise FlexiEdgeError(f"{path} not found: expected {SINGLE} or {INDEX} with its shards")
        return cls(*read_header(path))

    @classmethod
    def _open_shards(cls, folder: Path) -> "TensorFiles":
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise FlexiEdgeError(f"{folder / INDEX} is corrupt ({e}): re-create or re-download it") from None
        tensors, metadata = {}, {}
        for shard in sorted(set(weight_map.values())):
            found, meta = read_header(folder / shard)
            tensors.update(found)
            metadata.update(meta)
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise FlexiEdgeError(f"{folder / INDEX} lists {missing[0]} but its shard lacks it: the model is incomplete")
        return cls(tensors, metadata)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FlexiEdgeError(f"tensor {name} is not in the model's safetensors files: the checkpoint is "
                                 "incomplete or of another architecture") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in its own memory (optionally converted to `dtype`)."""
        info = self.info(name)
        raw = torch.empty(info.end - info.start, dtype=torch.uint8)
        f = self._handle(info.file)
        f.seek(info.start)
        if f.readinto(raw.numpy()) != raw.numel():
            raise FlexiEdgeError(f"{info.file} ends inside tensor {name}: the file is truncated")
        tensor = raw.view(info.dtype).reshape(info.shape)
        return tensor if dtype is None or dtype == info.dtype else tensor.to(dtype)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = open(path, "rb", buffering=0)
        return self._handles[path]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> "TensorFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor; names, dtypes and shapes are declared up front.

    The caller writes to a temporary path and renames it (see `cache.atomic_dir`); `sha256` is the
    whole file's digest, computed on the way.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header, offset = {}, 0
        for name, dtype, shape in entries:
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._pending = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")
        self._emit(struct.pack("<Q", len(text)) + text)
        self.sha256: str | None = None

    def _emit(self, data) -> None:
        self._hash.update(data)
        self._file.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._pending:
            raise ValueError(f"{name}: every declared tensor has been written")
        want = self._pending.pop(0)
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise ValueError(f"expected {want} next, got {got}")
        # reshape first: a "contiguous" tensor may keep odd strides on size-1 dimensions, which view() refuses
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        self._emit(memoryview(data))

    def close(self) -> str:
        if self._pending:
            self._file.close()
            raise ValueError(f"{len(self._pending)} declared tensors were not written, first {self._pending[0][0]}")
        self._file.close()
        self.sha256 = self._hash.hexdigest()
        return self.sha256

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write an in-memory dict (small models) with the same writer; returns the file's sha256."""
    with SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata) as w:
        for name, t in tensors.items():
            w.write(name, t)
    return w.sha256
