"""The checkpoint folder: each base weight stored exactly once, sharing re-tied by identity on load.

    RUN_DIR/
      config.json         HF config of the resulting stack (num_hidden_layers = its length)
      flexiedge.json      format version, the plan (slot map), parameter counts, weights checksum, provenance
      model.safetensors   every unique tensor once: kept blocks, slot adapters and norms, embeddings
      tokenizer files

A slot's projection weights are not in model.safetensors: they are the base layer's tensors, named
in the plan. A ShortGPT checkpoint is also a plain HF model folder.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .build import build_skeleton, retie_slots, shared_parameter_names
from .cache import atomic_dir
from .errors import FlexiEdgeError
from .models import BUILTIN_MODELS, file_sha256, load_model
from .plan import PROJECTIONS, Plan
from .tensorfile import write_tensors

FORMAT = "flexiedge-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
METADATA = "flexiedge.json"


@dataclass
class Checkpoint:
    model: torch.nn.Module
    tokenizer: object
    plan: Plan
    metadata: dict
    path: Path


def stored_tensors(model, plan: Plan) -> dict[str, torch.Tensor]:
    """The model's state dict without the names that alias another layer's Parameter."""
    _check_sharing(model, plan)
    skip = set(shared_parameter_names(plan))
    if model.config.tie_word_embeddings:
        skip.add("lm_head.weight")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in skip}


def parameter_counts(model, plan: Plan, tensors: dict[str, torch.Tensor]) -> dict:
    """Stored (unique) parameters and bytes, and the parameters the model computes with (shared counted per use)."""
    stored = sum(t.numel() for t in tensors.values())
    used = sum(p.numel() for p in model.parameters())  # parameters() yields each shared Parameter once
    used += sum(model.model.layers[p].get_submodule(n).weight.numel()
                for p in plan.slots for n in PROJECTIONS)
    return dict(stored=stored, stored_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                computed=used)


def save_checkpoint(model, tokenizer, plan: Plan, out: Path, provenance: dict, overwrite: bool = False) -> Path:
    out = Path(out)
    tensors = stored_tensors(model, plan)
    counts = parameter_counts(model, plan, tensors)
    counts["source"] = provenance.get("source_parameters", counts["stored"])
    counts["stored_ratio"] = counts["stored"] / counts["source"]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        sha256 = write_tensors(tmp / WEIGHTS, tensors, metadata={"format": FORMAT})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        metadata = dict(format=FORMAT, format_version=FORMAT_VERSION, plan=plan.to_json(), parameters=counts,
                        weights=dict(file=WEIGHTS, sha256=sha256,
                                     bytes=(tmp / WEIGHTS).stat().st_size),
                        provenance=dict(provenance, **software_versions()))
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
    return out


def read_metadata(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        problem = "is not a folder" if run_dir.exists() else "not found"
        raise FlexiEdgeError(f"{run_dir} {problem}: give a run folder written by `flexiedge prune`, "
                             "a model folder or a built-in model name")
    meta_path = run_dir / METADATA
    if not meta_path.is_file():
        raise FlexiEdgeError(f"{run_dir} has no {METADATA}: it is not a flexiedge checkpoint (run `flexiedge prune`)")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise FlexiEdgeError(f"{meta_path} is corrupt ({e}): re-run `flexiedge prune`") from None
    if metadata.get("format") != FORMAT or metadata.get("format_version", 0) > FORMAT_VERSION:
        raise FlexiEdgeError(f"{meta_path}: unsupported format {metadata.get('format')} "
                             f"v{metadata.get('format_version')}; this flexiedge reads {FORMAT} v{FORMAT_VERSION}")
    return metadata


def load_checkpoint(run_dir: Path, verify: bool = True) -> Checkpoint:
    """Load a run folder (or, without flexiedge.json, a plain model as an unpruned plan)."""
    from transformers import AutoConfig, AutoTokenizer

    run_dir = Path(run_dir)
    if is_plain_model(run_dir):
        model, tokenizer = load_model(run_dir)
        plan = Plan.identity(model.config.num_hidden_layers)
        return Checkpoint(model, tokenizer, plan, {"plan": plan.to_json()}, run_dir)
    metadata = read_metadata(run_dir)
    plan = Plan.from_json(metadata["plan"])
    weights = checked_weights(run_dir, metadata, verify)
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise FlexiEdgeError(f"{weights} is not a readable safetensors file ({e}): re-run `flexiedge prune`") from None
    config = AutoConfig.from_pretrained(run_dir, local_files_only=True)
    model = _materialise(build_skeleton(config, plan), plan, tensors, weights)
    tokenizer = AutoTokenizer.from_pretrained(run_dir, local_files_only=True)
    return Checkpoint(model, tokenizer, plan, metadata, run_dir)


def checked_weights(run_dir: Path, metadata: dict, verify: bool = True) -> Path:
    """The run's weights file, present and (with `verify`) matching the checksum in flexiedge.json."""
    weights = Path(run_dir) / metadata["weights"]["file"]
    if not weights.is_file():
        raise FlexiEdgeError(f"{weights} is missing: the checkpoint is incomplete; re-run `flexiedge prune`")
    if verify and file_sha256(weights) != metadata["weights"]["sha256"]:
        raise FlexiEdgeError(f"{weights} does not match the checksum in {METADATA}: the file is corrupt or "
                             "was modified; re-run `flexiedge prune`")
    return weights


def _materialise(model, plan: Plan, tensors: dict, weights: Path):
    result = model.load_state_dict(tensors, strict=False, assign=True)
    expected_missing = set(shared_parameter_names(plan)) | {"lm_head.weight"}
    missing = [k for k in result.missing_keys if k not in expected_missing]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise FlexiEdgeError(f"{weights} does not match its plan ({'missing' if missing else 'unexpected'} "
                             f"tensor {bad}): the checkpoint is corrupt; re-run `flexiedge prune`")
    retie_slots(model, plan)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary frequencies) are not in the file: rebuild them on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise FlexiEdgeError(f"{weights} lacks tensor {leftover[0]}: the checkpoint is corrupt; re-run `flexiedge prune`")
    return model.eval()


def is_plain_model(spec) -> bool:
    """A built-in model name, a GGUF file, or an HF folder that is not a flexiedge checkpoint."""
    path = Path(spec)
    return (str(spec) in BUILTIN_MODELS or path.suffix == ".gguf"
            or (path / "config.json").is_file() and not (path / METADATA).exists())


def _check_sharing(model, plan: Plan) -> None:
    layers = model.model.layers
    for position in plan.slots:
        base = layers[plan.layers[position].shares]
        for name in PROJECTIONS:
            if layers[position].get_submodule(name).weight is not base.get_submodule(name).weight:
                raise RuntimeError(f"slot {position} {name} does not share its base's Parameter")


def software_versions() -> dict:
    import transformers
    import flexiedge
    return dict(flexiedge=flexiedge.__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), machine=platform.machine())
