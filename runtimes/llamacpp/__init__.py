"""llama.cpp runtime for FlexiGPT GGUF files: the patch, its build, and a small Python API.

- `flexiedge-llama.patch`: lets GGUF tensors alias shared data and adds optional output norms to `llama`;
- `build.py`: builds and installs the patched llama-cpp-python wheel once (`ensure_runtime()`);
- `runtime.py`: `LlamaCppModel` (load with mmap + LoRA adapters, logits, score, generate, time) and
  `LlamaCppDecoder`, the decoder interface `runtimes.speculative` drives.

`LlamaCppModel` is imported lazily so that the build step works before llama_cpp is installed.
"""


def __getattr__(name: str):
    if name in ("LlamaCppModel", "LlamaCppDecoder", "Generation"):
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
