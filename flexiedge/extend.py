"""Extension (METHOD.md section 6): grow a model by repeating blocks, each repeat a slot of its source block.

A repeat shares its source block's Parameters (stored once), and owns LoRA adapters (PEFT start: A random,
B zero), copies of the block's two RMSNorms and output norms with a small gamma, so the deeper model
starts as (gamma = 0: exactly) the original function and learns what the repeats add.

Which blocks repeat (default: by Block Influence). A repeat with gamma -> 0 adds nothing at first, so the
choice is about where new capacity is most useful: the blocks whose own transformation is largest (highest
BI) are where the model already does the most work per layer, the same signal ShortGPT uses the other way
round. `--blocks` overrides the choice.
  block       each chosen block is followed by its repeat(s):   0 1 1' 2 3 3' ...
  sequential  one contiguous span is repeated after itself:     0 1 2 3 1' 2' 3' 4 ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .build import build_from_source
from .checkpoint import save_checkpoint
from .errors import FlexiEdgeError
from .models import check_architecture, load_model, resolve_model_dir
from .plan import LayerSpec, Plan
from .prune import CalibrationConfig, score_blocks

LAYOUTS = ("block", "sequential")


@dataclass
class ExtendConfig:
    to: int                              # number of layers of the extended model
    layout: str = "block"                # "block" or "sequential"
    rank: int = 32                       # LoRA rank of every repeat's projections
    output_norm_init: float = 0.01       # gamma of the repeats' output norms (0: exactly the original function)
    blocks: tuple[int, ...] | None = None  # source blocks to repeat (block) or the span's first block (sequential)

    def check(self, num_layers: int) -> int:
        if self.layout not in LAYOUTS:
            raise FlexiEdgeError(f"unknown layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        extra = self.to - num_layers
        if extra < 1:
            raise FlexiEdgeError(f"--to {self.to} must be larger than the model's {num_layers} layers")
        if self.layout == "sequential" and extra > num_layers - 2:
            raise FlexiEdgeError(f"a sequential span cannot exceed the {num_layers - 2} inner blocks: --to <= "
                                 f"{2 * num_layers - 2}")
        return extra


def repeated_blocks(scores: list[float], extra: int, layout: str) -> list[int]:
    """Source blocks to repeat: the highest-BI inner blocks (block), or the highest-BI span (sequential)."""
    inner = range(1, len(scores) - 1)
    if layout == "block":
        ranked = sorted(inner, key=lambda b: -scores[b])
        return sorted(ranked[i % len(ranked)] for i in range(extra))
    start = max(range(1, len(scores) - extra), key=lambda s: sum(scores[s:s + extra]))
    return list(range(start, start + extra))


def extension_plan(num_layers: int, repeats: list[int], layout: str, config: ExtendConfig,
                   scores: list[float] | None) -> Plan:
    layers: list[LayerSpec] = []
    position_of: dict[int, int] = {}

    def add_block(b):
        position_of[b] = len(layers)
        layers.append(LayerSpec(b))

    def add_repeat(b):
        layers.append(LayerSpec(b, shares=position_of[b], rank=config.rank))

    if layout == "block":
        for b in range(num_layers):
            add_block(b)
            for _ in range(repeats.count(b)):
                add_repeat(b)
    else:
        for b in range(num_layers):
            add_block(b)
            if b == repeats[-1]:
                for r in repeats:
                    add_repeat(r)
    return Plan(method="extend", num_source_layers=num_layers, layers=layers, block_influence=scores,
                output_norm=True, output_norm_init=config.output_norm_init, config=asdict(config))


def extend(model_spec: str, out: Path, config: ExtendConfig, calibration: CalibrationConfig,
           overwrite: bool = False) -> Path:
    folder = resolve_model_dir(model_spec)
    num_layers = check_architecture(folder)["num_hidden_layers"]
    extra = config.check(num_layers)
    model, tokenizer = load_model(folder)
    source_parameters = sum(p.numel() for p in model.parameters())
    scores, calib = (None, None)
    if config.blocks:
        repeats = list(config.blocks) if config.layout == "block" else list(range(config.blocks[0], config.blocks[0] + extra))
        if any(not 0 <= b < num_layers for b in repeats):
            raise FlexiEdgeError(f"--blocks must name blocks between 0 and {num_layers - 1}")
    else:
        scores, calib = score_blocks(model, tokenizer, calibration)
        repeats = repeated_blocks(scores, extra, config.layout)
    plan = extension_plan(num_layers, repeats, config.layout, config, scores)
    build_from_source(model, plan, svd_init=False)
    provenance = dict(source_model=str(model_spec), source_folder=str(folder), source_parameters=source_parameters,
                      calibration=calib, repeated_blocks=repeats)
    return save_checkpoint(model, tokenizer, plan, out, provenance, overwrite=overwrite)


def _command(args) -> None:
    from .cli import _print_info
    from .models import DEFAULT_MODEL

    blocks = tuple(args.blocks) if args.blocks else None
    config = ExtendConfig(to=args.to, layout=args.layout, rank=args.rank, output_norm_init=args.output_norm_init,
                          blocks=blocks)
    calibration = CalibrationConfig(texts=tuple(args.calib or CalibrationConfig.texts), tokens=args.calib_tokens)
    out = extend(args.model or DEFAULT_MODEL, Path(args.out), config, calibration, overwrite=args.force)
    print(f"wrote {out}")
    _print_info(out)


def add_commands(sub) -> None:
    p = sub.add_parser("extend", help="grow a model by repeating blocks with their own adapters and norms")
    p.add_argument("model", nargs="?", help="HF folder, .gguf file or built-in name (default: smollm2-135m)")
    p.add_argument("--to", type=int, required=True, help="number of layers of the extended model")
    p.add_argument("--layout", default="block", choices=LAYOUTS)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--output-norm-init", type=float, default=0.01)
    p.add_argument("--blocks", type=int, nargs="+", help="blocks to repeat (block) or the span's first block")
    p.add_argument("--calib", nargs="+")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_command)
