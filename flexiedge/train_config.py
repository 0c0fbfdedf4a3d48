"""The recovery fine-tune's settings: one dataclass, read from a YAML/JSON file and overridden by the CLI.

Precedence: dataclass defaults < `--config FILE` < command-line options. Every field is recorded in the
checkpoint's provenance, so a result can be traced to the exact settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .data import CALIBRATION_TEXTS, TRAIN_TEXTS
from .errors import FlexiEdgeError

# Recipes fill the settings left at None. "paper" is METHOD.md section 5 as published (the slot starts near
# identity, plain next-token loss); "flexiedge" adds the block-local warm start and distillation; "slots_kept"
# is flexiedge with half of every slot's adapter rank moved to LoRA on the kept blocks (same trainable
# parameters), the default because it recovered best at every budget measured in benchmarks/recovery_recipes.py.
RECIPES = {
    "paper": dict(warm_start_tokens=0, warm_start_steps=0, distill=0.0, norm_lr_scale=1.0, kept_share=0.0),
    "flexiedge": dict(warm_start_tokens=2048, warm_start_steps=0, distill=1.0, norm_lr_scale=1.0, kept_share=0.0),
    "slots_kept": dict(warm_start_tokens=2048, warm_start_steps=0, distill=1.0, norm_lr_scale=1.0, kept_share=0.5),
}
DEFAULT_RECIPE = "slots_kept"


@dataclass
class TrainConfig:
    tokens: int = 20_000                 # token budget: optimizer steps = ceil(tokens / tokens per step)
    data: tuple[str, ...] = TRAIN_TEXTS  # built-in text names, .txt or .jsonl files (disjoint from eval by default)
    seq_len: int = 256                   # packed sequence length
    batch_size: int = 4                  # sequences per micro-batch (per process)
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr: float = 4e-3                     # peak learning rate (paper)
    min_lr: float = 0.0                  # cosine decays from lr to min_lr
    warmup_steps: int = 0                # linear warmup steps before the cosine decay [open]
    weight_decay: float = 0.0            # AdamW decay on adapter matrices only (never on norms) [open]
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0               # max global gradient norm (0 = off)
    seed: int = 0                        # data order and new adapters' initialisation
    kept_lora: int = 0                   # rank of LoRA added to kept blocks (ShortGPT+LoRA baseline); 0 = none
    train_slot_norms: bool = True        # train the slots' own RMSNorm weights (METHOD.md section 5)
    eval_fraction: float = 0.05          # held-out share of the packed sequences (taken from the end)
    eval_every: int = 50                 # steps between held-out evaluations (0 = only at the end)
    eval_sequences: int = 16             # held-out sequences per evaluation (0 = all)
    save_every: int = 100                # steps between checkpoints (0 = only at the end and on Ctrl-C)
    precision: str = "auto"              # "auto" (fp32 on CPU, bf16/fp16 autocast on GPU), "fp32", "bf16", "fp16"
    recipe: str = DEFAULT_RECIPE         # fills the settings below left at None (RECIPES); "paper" = the paper's
    warm_start_tokens: int | None = None # calibration tokens for the block-local warm start of slots (0 = off)
    warm_start_steps: int | None = None  # Adam steps per slot after the closed-form gammas (0 = gammas only)
    warm_start_lr: float = 2e-3          # peak lr of those steps (cosine to 0)
    warm_start_init: str = "svd"         # adapters: "svd" (paper, weight space) or "activation_aware" (whitened SVD)
    warm_start_data: tuple[str, ...] = CALIBRATION_TEXTS  # calibration texts (disjoint from train and eval)
    distill: float | None = None         # weight of KL(unpruned teacher || model); loss = (1-w) CE + w KL
    distill_topk: int = 64               # teacher log-probs cached per position (the rest is one bucket)
    teacher_cache: str | None = None     # folder of cached teacher top-k (default: the flexiedge cache)
    norm_lr_scale: float | None = None   # lr multiplier for norm gammas (output norms, slot RMSNorms)
    train_slots: bool = True             # train the slots' adapters and norms (False: only --kept-lora trains)
    kept_share: float | None = None      # share of each slot's adapter rank moved to LoRA on the kept blocks
                                         # (its leading singular directions stay; the freed parameters set
                                         # the kept-block rank); 0 = slots only

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise FlexiEdgeError(f"unknown recipe {self.recipe!r}: use one of {', '.join(RECIPES)}")
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                # an explicit --kept-lora rank is the user's choice: the recipe's kept share yields to it
                setattr(self, name, 0.0 if name == "kept_share" and self.kept_lora else value)

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * world_size

    def total_steps(self, world_size: int = 1) -> int:
        return max(1, -(-self.tokens // self.tokens_per_step(world_size)))

    def check(self) -> None:
        positive = ("tokens", "seq_len", "batch_size", "grad_accum")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise FlexiEdgeError(f"{bad[0]} must be >= 1, got {getattr(self, bad[0])}")
        if not 0 < self.eval_fraction < 1:
            raise FlexiEdgeError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise FlexiEdgeError(f"unknown precision {self.precision!r}: use auto, fp32, bf16 or fp16")
        if self.kept_lora < 0:
            raise FlexiEdgeError(f"--kept-lora must be >= 0, got {self.kept_lora}")
        if not 0 <= self.distill <= 1:
            raise FlexiEdgeError(f"--distill must be between 0 and 1, got {self.distill}")
        if self.warm_start_init not in ("svd", "activation_aware"):
            raise FlexiEdgeError(f"unknown warm_start_init {self.warm_start_init!r}: use svd or activation_aware")
        if not 0 <= self.kept_share < 1:
            raise FlexiEdgeError(f"--kept-share must be in [0, 1), got {self.kept_share}")
        if self.kept_share and self.kept_lora:
            raise FlexiEdgeError("--kept-share sets the kept-block LoRA rank itself: drop --kept-lora (or use "
                                 "--kept-share 0)")
        if self.distill_topk < 1 or self.warm_start_tokens < 0 or self.warm_start_steps < 0:
            raise FlexiEdgeError("distill_topk must be >= 1, warm_start_tokens and warm_start_steps >= 0")

    def to_json(self) -> dict:
        return asdict(self)


def coerce_value(name: str, value):
    if name in ("data", "betas", "warm_start_data") and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def config_from(file: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults, then the YAML/JSON `file`, then the non-None `overrides` (command-line options)."""
    values = {}
    if file is not None:
        values.update(read_config_file(Path(file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FlexiEdgeError(f"unknown training setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
    config = TrainConfig(**{k: coerce_value(k, v) for k, v in values.items()})
    config.check()
    return config


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise FlexiEdgeError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: one message for both
        raise FlexiEdgeError(f"{path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise FlexiEdgeError(f"{path} must hold a mapping of setting: value")
    return data
