"""The command line: one thin subcommand per stage, every option mapped onto a config dataclass."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .errors import FlexiEdgeError
from .plan import RANK_ALLOCATIONS, SELECTIONS

# Modules that add their own subcommands: each defines `add_commands(subparsers)`. Export formats
# register under `flexiedge export FORMAT` with `add_export_command(export_subparsers)`.
COMMAND_MODULES: tuple[str, ...] = ("flexiedge.recover", "flexiedge.generate", "flexiedge.extend", "flexiedge.package", "flexiedge.pipeline", "flexiedge.devices.cli")
EXPORT_MODULES: tuple[str, ...] = ("flexiedge.exporters.onnx", "flexiedge.exporters.gguf")


def _prune(args) -> None:
    from .models import DEFAULT_MODEL
    from .plan import PruneConfig
    from .prune import CalibrationConfig, prune

    config = PruneConfig(ratio=args.ratio, blocks=args.blocks, method=args.method, rank=args.rank,
                         selection=args.selection, selection_rank=args.selection_rank,
                         rank_allocation=args.rank_allocation,
                         svd_init=not args.no_svd_init, output_norm=not args.no_output_norm,
                         output_norm_init=args.output_norm_init, protect_ends=not args.allow_ends, svd=args.svd)
    calibration = CalibrationConfig(texts=tuple(args.calib or CalibrationConfig.texts), tokens=args.calib_tokens,
                                    seq_len=args.seq_len)
    from .memory import StageLog
    out = prune(args.model or DEFAULT_MODEL, Path(args.out), config, calibration, overwrite=args.force,
                stream=args.stream, log=StageLog(print_to_stderr=args.report_memory))
    print(f"wrote {out}")
    _print_info(out)


def _eval(args) -> None:
    from .checkpoint import load_checkpoint
    from .data import EVAL_TEXTS, text_provenance, tokenize_texts
    from .evaluate import perplexity
    from .report import storage_summary

    ckpt = load_checkpoint(Path(args.run))
    if args.tasks:  # zero-shot multiple-choice accuracy instead of perplexity (flexiedge/zeroshot.py)
        return _eval_tasks(args, ckpt)
    texts = args.text or list(EVAL_TEXTS)
    ids = tokenize_texts(ckpt.tokenizer, texts)
    result = perplexity(ckpt.model, ids, context=args.context, stride=args.stride, max_tokens=args.max_tokens,
                        batch_size=args.batch_size)
    report = dict(run=str(args.run), texts=text_provenance(texts), perplexity=result.as_dict(),
                  storage=storage_summary(ckpt))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"perplexity {result.ppl:.3f} over {result.tokens} tokens of {', '.join(texts)} "
              f"(context {result.context}, stride {result.stride})")
        s = report["storage"]
        print(f"stored parameters {s['stored']:,} ({s['stored_ratio']:.3f} of the source), "
              f"{s['stored_bytes'] / 2**20:.1f} MiB")


def _eval_tasks(args, ckpt) -> None:
    from .zeroshot import eval_tasks

    results = [r.as_dict() for r in eval_tasks(ckpt.model, ckpt.tokenizer, args.tasks, args.limit)]
    if args.json:
        print(json.dumps(dict(run=str(args.run), tasks=results), indent=2))
    for r in [] if args.json else results:
        print(f"{r['task']}: accuracy {r['acc']:.4f} +- {r['stderr']:.4f} over {r['n']} examples")


def _info(args) -> None:
    _print_info(Path(args.run), as_json=args.json)


def _print_info(run: Path, as_json: bool = False) -> None:
    from .report import describe_run
    text, data = describe_run(run)
    print(json.dumps(data, indent=2) if as_json else text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexiedge", description="FlexiGPT pruning and on-device export")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="score blocks, prune, share and adapt; write a checkpoint")
    p.add_argument("model", nargs="?", help="HF folder, .gguf file or built-in name (default: smollm2-135m)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of blocks to prune (default 0.3)")
    p.add_argument("--blocks", type=int, help="number of blocks to prune (overrides --ratio)")
    p.add_argument("--method", default="flexigpt", choices=["flexigpt", "shortgpt"])
    p.add_argument("--rank", type=int, default=32, help="LoRA rank per slot projection (default 32)")
    p.add_argument("--selection", default="lowrank", choices=list(SELECTIONS),
                   help="base-block choice: low-rank SVD distance (paper), plain Frobenius (ablation) or "
                   "functional (the base whose rank-r corrected output on the pruned block's inputs is closest)")
    p.add_argument("--rank-allocation", default="uniform", choices=list(RANK_ALLOCATIONS),
                   help="uniform: every slot --rank; energy: the same total, split by the spectra of W_pruned - W_base")
    p.add_argument("--selection-rank", type=int, help="rank r of the SVD distance (default: --rank)")
    p.add_argument("--no-svd-init", action="store_true", help="ablation: random A / zero B adapters")
    p.add_argument("--no-output-norm", action="store_true", help="ablation: no output feature normalisation")
    p.add_argument("--output-norm-init", type=float, default=0.01, help="initial gamma of output norms")
    p.add_argument("--allow-ends", action="store_true", help="allow pruning the first and last blocks")
    p.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"])
    p.add_argument("--calib", nargs="+", help="calibration texts: built-in names, .txt or .jsonl files")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="prune block by block without loading the whole model (default: when it would not fit)")
    p.add_argument("--report-memory", action="store_true", help="print each stage's time and peak RSS")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_prune)

    p = sub.add_parser("eval", help="perplexity and stored size of a run (or of a plain model)")
    p.add_argument("run", help="run folder, HF folder, .gguf file or built-in model name")
    p.add_argument("--text", nargs="+", help="evaluation texts (default: alice29, disjoint from calibration)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, help="window stride (default: --context, disjoint windows)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true")
    p.add_argument("--tasks", nargs="+", help="zero-shot accuracy on multiple-choice task files (BIG-bench "
                   "task.json or .jsonl of context/choices/label) instead of perplexity")
    p.add_argument("--limit", type=int, help="with --tasks: score the first N examples of each task")
    p.set_defaults(func=_eval)

    p = sub.add_parser("info", help="slot map, stored vs computed parameters, savings")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    export = sub.add_parser("export", help="export a run to an on-device format")
    export_sub = export.add_subparsers(dest="format", required=True)
    for name in EXPORT_MODULES:
        importlib.import_module(name).add_export_command(export_sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FlexiEdgeError as e:
        print(f"flexiedge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexiedge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
