"""What each bundle target holds and how its runtime loads it: GGUF for llama.cpp, ONNX for onnxruntime.

A target knows three things: how to export a run (the exporters in flexiedge/exporters/), which export
files go into the bundle, and how to load the bundle in its runtime from the bundle's own config file
(`llama_params.json` for llama.cpp, `genai_config.json` for onnxruntime).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import FlexiEdgeError

TARGETS = ("gguf", "onnx")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
EXPORT_REPORT = "flexiedge-export.json"
LLAMA_PARAMS = "llama_params.json"


@dataclass
class ExportSettings:
    """Export options for both targets (one config object; each target reads its own fields)."""
    gguf_type: str = "f16"        # f32 | f16 | q8_0 | q4_k
    onnx_precision: str = "fp32"  # fp32 | fp16 | int8 | int4
    verify: bool = True           # the exporters' own checks (read-back, logits vs PyTorch)

    def for_target(self, target: str) -> dict:
        return dict(type=self.gguf_type, layout="compact") if target == "gguf" else dict(precision=self.onnx_precision)


@dataclass
class RuntimeSettings:
    """How the bundled runtime loads the model (written into the bundle, read back by verify and run)."""
    n_ctx: int = 2048
    n_threads: int | None = None  # None: the device profile's cores, else the loading machine's
    kv_type: str = "f16"          # llama.cpp KV-cache type


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise FlexiEdgeError(f"unknown --target {target!r}: use one of {', '.join(TARGETS)}")


def export(target: str, run_dir: Path, out: Path, settings: ExportSettings, overwrite: bool = False) -> dict:
    """Export `run_dir` to `out` with the target's exporter (which verifies before it returns)."""
    check_target(target)
    options = settings.for_target(target)
    if target == "gguf":
        from .exporters.gguf import GGUFExportConfig, export_gguf
        return export_gguf(Path(run_dir), Path(out), GGUFExportConfig(verify=settings.verify, **options), overwrite)
    from .exporters.onnx import OnnxExportConfig, export_onnx
    return export_onnx(Path(run_dir), Path(out), OnnxExportConfig(verify=settings.verify, **options), overwrite)


def model_files(target: str, export_dir: Path) -> list[str]:
    """The export's model files (bundle-relative names), in a fixed order; refuses an incomplete export."""
    want = {"gguf": ["model.gguf", "adapters.gguf?"], "onnx": ["model.onnx", "model.onnx.data", "genai_config.json"]}
    found = []
    for name in want[target]:
        optional, name = name.endswith("?"), name.rstrip("?")
        if (export_dir / name).is_file():
            found.append(name)
        elif not optional:
            raise FlexiEdgeError(f"{export_dir} has no {name}: it is not a complete {target} export")
    return found


def copy_files(export_dir: Path, run_dir: Path, target: str, bundle: Path) -> None:
    """Model files and the export report from the export; tokenizer files from the run."""
    for name in model_files(target, export_dir) + [EXPORT_REPORT]:
        if (export_dir / name).is_file():
            shutil.copyfile(export_dir / name, bundle / name)
    for name in TOKENIZER_FILES:
        src = export_dir / name if (export_dir / name).is_file() else run_dir / name
        if src.is_file():
            shutil.copyfile(src, bundle / name)


def write_runtime_config(target: str, bundle: Path, settings: RuntimeSettings, threads: int | None,
                         max_context: int | None = None) -> str:
    """The runtime's loading parameters; returns the file's name. ONNX: genai_config.json (from the export)."""
    if target == "onnx":
        return "genai_config.json"
    params = dict(model="model.gguf", adapters="adapters.gguf" if (bundle / "adapters.gguf").is_file() else None,
                  adapter_scale=1.0, n_ctx=min(settings.n_ctx, max_context or settings.n_ctx), n_threads=settings.n_threads or threads,
                  use_mmap=True, kv_type=settings.kv_type, flash_attn=None,
                  note="mmap keeps each shared base block resident once; adapters apply at scale 1")
    (bundle / LLAMA_PARAMS).write_text(json.dumps(params, indent=2) + "\n")
    return LLAMA_PARAMS


def load(target: str, bundle: Path, threads: int | None = None):
    """The bundle's model in its runtime, loaded from the bundle's own config; a context manager."""
    check_target(target)
    if target == "onnx":
        return load_export("onnx", bundle, threads)
    params = json.loads((bundle / LLAMA_PARAMS).read_text())
    adapters = bundle / params["adapters"] if params.get("adapters") else None
    return _load_gguf(bundle / params["model"], adapters, threads or params.get("n_threads"), params["n_ctx"],
                      params.get("kv_type", "f16"), params.get("flash_attn"))


def load_export(target: str, folder: Path, threads: int | None = None, n_ctx: int = 2048):
    """An export folder (not yet bundled) in its runtime; a context manager."""
    check_target(target)
    if target == "onnx":
        from .runtimes.onnxruntime import OrtModel
        return _Closing(OrtModel.load(folder, threads=threads))
    adapters = folder / "adapters.gguf"
    return _load_gguf(folder / "model.gguf", adapters if adapters.is_file() else None, threads, n_ctx, "f16", None)


def _load_gguf(model: Path, adapters: Path | None, threads: int | None, n_ctx: int, kv_type: str, flash_attn):
    from .runtimes.llamacpp.build import runtime_status
    status = runtime_status()
    if not status.ok:
        raise FlexiEdgeError(status.reason)
    from .runtimes.llamacpp import LlamaCppModel
    return LlamaCppModel.load(model, adapters, n_threads=threads, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn)


class _Closing:
    """OrtModel has no close(); give it the same `with` shape as LlamaCppModel."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        self.model = None
