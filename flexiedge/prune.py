"""The prune stage: load -> score (Block Influence) -> select blocks and bases -> build -> save."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .blockwise import fp32_bytes, prune_blockwise
from .build import build_from_source
from .checkpoint import save_checkpoint
from .data import CALIBRATION_TEXTS, text_provenance, token_windows, tokenize_texts
from .errors import FlexiEdgeError
from .influence import block_influence
from .memory import StageLog, available_memory_bytes
from .models import check_architecture, load_model, resolve_model_dir
from .plan import (PROJECTIONS, Plan, PruneConfig, block_distances, choose_bases, energy_ranks, make_plan,
                   select_pruned_blocks)
from .warmstart import functional_distances


@dataclass
class CalibrationConfig:
    """Calibration text for Block Influence and (later) warm starts."""
    texts: tuple[str, ...] = CALIBRATION_TEXTS
    tokens: int = 8192
    seq_len: int = 512
    batch_size: int = 4


def check_rank(model_config: dict, config: PruneConfig) -> None:
    """Refuse ranks no projection can hold, from config.json alone (before any weight is loaded)."""
    if config.method != "flexigpt":
        return
    hidden, heads = model_config["hidden_size"], model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or hidden // heads
    kv_heads = model_config.get("num_key_value_heads") or heads
    limit = min(hidden, heads * head_dim, kv_heads * head_dim, model_config["intermediate_size"])
    if config.rank > limit:
        raise FlexiEdgeError(f"--rank {config.rank} is larger than the smallest projection allows ({limit}): "
                             f"choose a rank <= {limit}")
    if config.selection_rank is not None and not 0 < config.selection_rank <= limit:
        raise FlexiEdgeError(f"--selection-rank must be between 1 and {limit}")


def calibration_windows(tokenizer, calibration: CalibrationConfig) -> torch.Tensor:
    return token_windows(tokenize_texts(tokenizer, calibration.texts), calibration.seq_len, calibration.tokens)


def calibration_record(calibration: CalibrationConfig, windows: torch.Tensor) -> dict:
    """What the checkpoint's provenance says about the calibration text."""
    return dict(asdict(calibration), texts=text_provenance(calibration.texts), tokens_used=windows.numel())


def score_blocks(model, tokenizer, calibration: CalibrationConfig,
                 windows: torch.Tensor | None = None) -> tuple[list[float], dict]:
    """Block Influence on the calibration windows (tokenized here unless the caller already has them)."""
    windows = calibration_windows(tokenizer, calibration) if windows is None else windows
    return block_influence(model, windows, calibration.batch_size), calibration_record(calibration, windows)


def plan_pruning(model, scores: list[float], config: PruneConfig, windows: torch.Tensor | None = None) -> Plan:
    """`windows`: calibration token windows, needed by `selection="functional"` only."""
    config.check()
    num_layers = len(scores)
    pruned = select_pruned_blocks(scores, config.num_to_prune(num_layers), config.protect_ends)
    if config.method != "flexigpt":
        return make_plan(config, scores, pruned, None)
    bases = choose_base_blocks(model, pruned, config, windows)
    ranks = energy_ranks(model.model.layers, bases, config.rank) if config.rank_allocation == "energy" else None
    return make_plan(config, scores, pruned, bases, ranks)


def choose_base_blocks(model, pruned: list[int], config: PruneConfig, windows: torch.Tensor | None) -> dict[int, int]:
    kept = [b for b in range(len(model.model.layers)) if b not in pruned]
    rank = config.selection_rank or max(config.rank, 1)
    if config.selection != "functional":
        return choose_bases(block_distances(model.model.layers, pruned, kept, rank, config.selection, config.svd))
    if windows is None:
        raise FlexiEdgeError("--selection functional needs calibration text (prune the model with `flexiedge prune`)")
    windows = windows[:max(1, config.selection_tokens // windows.shape[1])]
    return choose_bases(functional_distances(model, pruned, kept, rank, windows, svd=config.svd))


def apply_plan(model, plan: Plan, config: PruneConfig):
    with tqdm(total=len(plan.slots), desc="building slots", unit="slot", disable=not plan.slots) as bar:
        return build_from_source(model, plan, svd_init=config.svd_init, svd=config.svd, progress=bar)


def prune(model_spec: str, out: Path, config: PruneConfig, calibration: CalibrationConfig,
          overwrite: bool = False, stream: bool | None = None, log: StageLog | None = None) -> Path:
    """`stream`: True prunes block by block (blockwise.py), None does so when the model would not fit."""
    config.check()
    folder = resolve_model_dir(model_spec)
    model_config = check_architecture(folder)  # fail fast, before loading any weights
    config.num_to_prune(model_config["num_hidden_layers"])
    check_rank(model_config, config)
    log = log or StageLog()
    if stream or stream is None and needs_streaming(folder):
        return prune_blockwise(folder, out, config, calibration, model_spec, overwrite, log)
    model, tokenizer = load_model(folder)
    source_parameters = sum(p.numel() for p in model.parameters())
    with log.stage("score"):
        windows = calibration_windows(tokenizer, calibration)
        scores, calib = score_blocks(model, tokenizer, calibration, windows)
    provenance = dict(source_model=str(model_spec), source_folder=str(folder),
                      source_parameters=source_parameters, calibration=calib)
    return prune_scored(model, tokenizer, scores, windows, config, out, provenance, overwrite, log)


def prune_scored(model, tokenizer, scores: list[float], windows: torch.Tensor, config: PruneConfig, out: Path,
                 provenance: dict, overwrite: bool = False, log: StageLog | None = None) -> Path:
    """Select, build and save, from a loaded source model and its scores (`prune` and the pipeline)."""
    log = log or StageLog()
    with log.stage("select_init"):
        plan = plan_pruning(model, scores, config, windows)
        apply_plan(model, plan, config)
    with log.stage("save"):
        return save_checkpoint(model, tokenizer, plan, out, dict(provenance, stages=log.records), overwrite=overwrite)


def needs_streaming(folder: Path, fraction: float = 0.4) -> bool:
    """Whether the model in fp32 would take more than `fraction` of the memory available now (only
    safetensors folders can stream; others, such as pytorch_model.bin, load whole)."""
    if not any(Path(folder).glob("*.safetensors")):
        return False
    return fp32_bytes(folder) > fraction * available_memory_bytes()



def variant(model, plan: Plan, config: PruneConfig):
    """A pruned copy of an already-scored source model (benchmarks build several from one load)."""
    return apply_plan(copy.deepcopy(model), plan, config)
