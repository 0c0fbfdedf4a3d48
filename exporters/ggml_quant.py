"""llama.cpp's own quantizer, one tensor at a time: `ggml_quantize_chunk` from libggml-base through ctypes.

llama_model_quantize (pure, no imatrix) calls exactly this function on each tensor's float32 rows, so
the bytes are the same as quantizing a whole F32 GGUF file, without writing one. The library ships with
the installed llama-cpp-python wheel (llama_cpp/lib/libggml-base.so); it is found without importing
llama_cpp, so no llama.cpp backend starts.

    data = quantize(w, Q.Q4_K)       # w: float32 (rows, n_per_row) -> uint8 (rows, row bytes)

Rows are split over a few threads: ctypes releases the GIL while the C function runs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from flexiedge.errors import FlexiEdgeError

LIBRARY = "libggml-base.so"
CHUNK_ELEMENTS = 1 << 22  # rows per task: ~4M weights (16 MB of float32), so 2 threads stay busy to the end
_lib: ctypes.CDLL | None = None


def library_path() -> Path | None:
    """libggml-base.so of the installed llama-cpp-python, or None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "lib" / LIBRARY
        if path.is_file():
            return path
    return None


def available() -> bool:
    return library_path() is not None


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        path = library_path()
        if path is None:
            raise FlexiEdgeError("quantizing needs llama.cpp's ggml library (llama_cpp/lib/libggml-base.so): "
                                 "run python -m flexiedge.runtimes.llamacpp.build")
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        _lib = lib
    return _lib


def _check_type(lib: ctypes.CDLL, qtype: Q) -> None:
    """gguf-py's enum and the library's must agree (they are the same C enum, but versions move)."""
    name = lib.ggml_type_name(int(qtype))
    if name is None or name.decode().lower() != qtype.name.lower():
        raise FlexiEdgeError(f"llama.cpp's ggml calls type {int(qtype)} {name!r}, gguf-py calls it {qtype.name}: "
                             "the gguf and llama-cpp-python versions do not match")
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise FlexiEdgeError(f"{qtype.name} needs an importance matrix, which the exporter does not compute")


def quantize(array: np.ndarray, qtype: Q, threads: int | None = None) -> np.ndarray:
    """float32 (rows, n_per_row) -> uint8 (rows, row bytes) in `qtype`, as llama_model_quantize writes it."""
    lib = _library()
    _check_type(lib, qtype)
    src = np.ascontiguousarray(array, dtype=np.float32)
    if src.ndim == 1:
        src = src.reshape(1, -1)
    src = src.reshape(-1, src.shape[-1])
    nrows, n_per_row = src.shape
    size = int(lib.ggml_row_size(int(qtype), n_per_row))
    dst = np.empty((nrows, size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(1, n_per_row))
    chunks = [(r, min(step, nrows - r)) for r in range(0, nrows, step)]

    def run(chunk: tuple[int, int]) -> bool:
        row, n = chunk
        out = dst.ctypes.data + row * size
        written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data + row * n_per_row * 4, out, 0, n,
                                          n_per_row, None)
        return written == n * size and lib.ggml_validate_row_data(int(qtype), out, written)

    threads = threads or min(2, os.cpu_count() or 1)
    if threads < 2 or len(chunks) < 2:
        ok = all(map(run, chunks))
    else:
        with ThreadPoolExecutor(threads) as pool:
            ok = all(pool.map(run, chunks))
    if not ok:  # llama_model_quantize fails the same way ("quantized data validation failed")
        raise FlexiEdgeError(f"llama.cpp's {qtype.name} quantizer produced invalid data (inf in the weights?)")
    return dst.reshape(*array.shape[:-1], size) if array.ndim > 1 else dst.reshape(size)
