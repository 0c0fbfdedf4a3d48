"""The prune stage: load -> score (Block Influence) -> select blocks and bases -> build -> save."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .build import build_from_source
from .checkpoint import save_checkpoint
from .data import CALIBRATION_TEXTS, text_provenance, token_windows, tokenize_texts
from .errors import FlexiEdgeError
from .influence import block_influence
from .models import check_architecture, load_model, resolve_model_dir
from .plan import PROJECTIONS, Plan, PruneConfig, block_distances, choose_bases, make_plan, select_pruned_blocks


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


def score_blocks(model, tokenizer, calibration: CalibrationConfig) -> tuple[list[float], dict]:
    ids = tokenize_texts(tokenizer, calibration.texts)
    windows = token_windows(ids, calibration.seq_len, calibration.tokens)
    scores = block_influence(model, windows, calibration.batch_size)
    return scores, dict(asdict(calibration), texts=text_provenance(calibration.texts), tokens_used=windows.numel())


def plan_pruning(model, scores: list[float], config: PruneConfig) -> Plan:
    config.check()
    num_layers = len(scores)
    pruned = select_pruned_blocks(scores, config.num_to_prune(num_layers), config.protect_ends)
    bases = None
    if config.method == "flexigpt":
        kept = [b for b in range(num_layers) if b not in pruned]
        rank = config.selection_rank or max(config.rank, 1)
        distances = block_distances(model.model.layers, pruned, kept, rank, config.selection, config.svd)
        bases = choose_bases(distances)
    return make_plan(config, scores, pruned, bases)


def apply_plan(model, plan: Plan, config: PruneConfig):
    with tqdm(total=len(plan.slots), desc="building slots", unit="slot", disable=not plan.slots) as bar:
        return build_from_source(model, plan, svd_init=config.svd_init, svd=config.svd, progress=bar)


def prune(model_spec: str, out: Path, config: PruneConfig, calibration: CalibrationConfig,
          overwrite: bool = False) -> Path:
    config.check()
    folder = resolve_model_dir(model_spec)
    model_config = check_architecture(folder)  # fail fast, before loading any weights
    config.num_to_prune(model_config["num_hidden_layers"])
    check_rank(model_config, config)
    model, tokenizer = load_model(folder)
    source_parameters = sum(p.numel() for p in model.parameters())
    scores, calib = score_blocks(model, tokenizer, calibration)
    plan = plan_pruning(model, scores, config)
    apply_plan(model, plan, config)
    provenance = dict(source_model=str(model_spec), source_folder=str(folder),
                      source_parameters=source_parameters, calibration=calib)
    return save_checkpoint(model, tokenizer, plan, out, provenance, overwrite=overwrite)


def variant(model, plan: Plan, config: PruneConfig):
    """A pruned copy of an already-scored source model (benchmarks build several from one load)."""
    return apply_plan(copy.deepcopy(model), plan, config)
