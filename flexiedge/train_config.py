"""The recovery fine-tune's settings: one dataclass, read from a YAML/JSON file and overridden by the CLI.

Precedence: dataclass defaults < `--config FILE` < command-line options. Every field is recorded in the
checkpoint's provenance, so a result can be traced to the exact settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .data import TRAIN_TEXTS
from .errors import FlexiEdgeError


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

    def to_json(self) -> dict:
        return asdict(self)


def _coerce(name: str, value):
    if name in ("data", "betas") and isinstance(value, (list, tuple)):
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
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
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
