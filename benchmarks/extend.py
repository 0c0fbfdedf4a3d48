"""Extension: SmolLM2-135M grown by ~50% depth (30 -> 45 layers), continued pretraining vs the fair control.

    nice -n 5 python benchmarks/extend.py                          # -> benchmarks/results/extend.{json,md}
    nice -n 5 python benchmarks/extend.py --tokens 2048 4096 --eval-tokens 2048

The control is the original 30-layer model trained on the same tokens, in the same order, with LoRA on all
its blocks at the rank that matches the extended model's trainable-parameter count. PPL is on alice29
(never trained on). Decode time is plain greedy decoding in PyTorch, interleaved, median over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Python puts this folder first on sys.path, where benchmarks/{gguf,onnx}.py would shadow those packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from common import markdown_table, write_result  # noqa: E402
from recovery import held_out_ppl, matching_kept_rank, recovery_curve  # noqa: E402

from flexiedge.checkpoint import load_checkpoint  # noqa: E402
from flexiedge.data import EVAL_TEXTS, tokenize_texts  # noqa: E402
from flexiedge.extend import ExtendConfig, extend  # noqa: E402
from flexiedge.models import DEFAULT_MODEL, resolve_model_dir  # noqa: E402
from flexiedge.prune import CalibrationConfig  # noqa: E402
from flexiedge.runtimes.pytorch import TorchDecoder, time_decoding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTIAL = ROOT / "benchmarks" / "results" / "extend.partial.json"


def init_max_abs_diff(original: Path, work: Path, to: int, rank: int, ids: torch.Tensor) -> float:
    """Logits of the extended model at gamma = 0 against the original's, on real text."""
    run = extend(str(original), work / f"smollm2-ext{to}-gamma0", ExtendConfig(to=to, rank=rank, output_norm_init=0.0),
                 CalibrationConfig(tokens=2048), overwrite=True)
    with torch.no_grad():
        a = load_checkpoint(run).model(input_ids=ids).logits
        b = load_checkpoint(original).model(input_ids=ids).logits
    return float((a - b).abs().max())


def decode_time_ratio(extended: Path, original: Path, prompt: list[int], new_tokens: int, repeats: int = 3) -> float:
    ext, orig = TorchDecoder(load_checkpoint(extended).model), TorchDecoder(load_checkpoint(original).model)
    ratios = []
    for _ in range(repeats):
        e = time_decoding(ext, prompt, new_tokens)["decode_tps"]
        o = time_decoding(orig, prompt, new_tokens)["decode_tps"]
        ratios.append(o / e)  # time ratio = inverse throughput ratio
    return statistics.median(ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", type=int, default=45)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--work", default=str(ROOT / "runs"))
    args = parser.parse_args()

    work = Path(args.work)
    original = resolve_model_dir(DEFAULT_MODEL)
    tokenizer = load_checkpoint(original).tokenizer
    ids = tokenize_texts(tokenizer, EVAL_TEXTS)
    diff0 = init_max_abs_diff(original, work, args.to, args.rank, ids[None, :256])
    extended = work / f"smollm2-ext{args.to}"
    if not extended.exists():
        extend(str(original), extended, ExtendConfig(to=args.to, rank=args.rank), CalibrationConfig(tokens=2048))
    control_rank, ext_trainable, control_trainable = matching_kept_rank(extended, original)

    done = json.loads(PARTIAL.read_text()) if PARTIAL.exists() else {}
    # The paper recipe (plain next-token loss): warm starts fit slots to pruned blocks, which extension lacks.
    fields = dict(seq_len=args.seq_len, batch_size=4, eval_every=0, save_every=0, recipe="paper")
    curves = {
        "extended": recovery_curve("extended", extended, work / f"smollm2-ext{args.to}-trained", args.tokens,
                                   fields, args.eval_tokens, done, PARTIAL),
        "original": recovery_curve("original", original, work / "smollm2-original-trained", args.tokens,
                                   dict(fields, kept_lora=control_rank), args.eval_tokens, done, PARTIAL),
    }
    ext_meta = json.loads((extended / "flexiedge.json").read_text())["parameters"]
    time_ratio = decode_time_ratio(extended, original, ids[:64].tolist(), 32)
    top = str(max(args.tokens))
    summary = dict(init_logit_max_abs_diff_gamma0=diff0, ppl_original=curves["original"]["0"],
                   ppl_extended_start=curves["extended"]["0"], ppl_extended_trained=curves["extended"][top],
                   ppl_original_trained_same_tokens=curves["original"][top], tokens=max(args.tokens),
                   stored_param_ratio=ext_meta["stored"] / ext_meta["source"],
                   decode_time_ratio_vs_original=time_ratio)
    rows = [dict(model=name, **{f"ppl@{k}": v for k, v in curve.items() if k.isdigit()},
                 trainable=curve["trainable_parameters"], stored_MiB=curve["stored_bytes"] / 2**20,
                 train_tok_s=curve["tokens_per_s_median"]) for name, curve in curves.items()]
    table = markdown_table(rows, list(rows[0]))
    print(table)
    print(summary)
    settings = dict(vars(args), layout="block", control_kept_lora_rank=control_rank,
                    trainable_extended=ext_trainable, trainable_control=control_trainable,
                    eval_texts=list(EVAL_TEXTS))
    write_result("extend", summary, settings, dict(curves=curves), table)


if __name__ == "__main__":
    main()
