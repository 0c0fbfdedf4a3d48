"""Self-speculative decoding vs plain decoding, per runtime, for k = 1..6 (SmolLM2-135M FlexiGPT 30%).

    python benchmarks/speculative.py                          # torch (+ onnx / llama.cpp when exported)
    python benchmarks/speculative.py --prompts 2 --new-tokens 32 --runtimes torch   # a quick look
    python benchmarks/speculative.py --runtimes torch onnx   # onnx: exports to runs/exports/spec-onnx/ once

The draft is the FlexiGPT model with its slots skipped (ShortGPT's architecture on the same weights).
Every speculative output is compared token for token with plain greedy decoding of the full model.
Times are measured side by side in one run, interleaved, medians over prompts: ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# This folder holds onnx.py, which must not shadow the onnx package: search it last (for common.py).
_HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from common import markdown_table, write_result  # noqa: E402

from flexiedge.checkpoint import load_checkpoint  # noqa: E402
from flexiedge.data import EVAL_TEXTS, tokenize_texts  # noqa: E402
from flexiedge.generate import draft_cost  # noqa: E402
from flexiedge.runtimes.pytorch import TorchDecoder, greedy_generate  # noqa: E402
from flexiedge.runtimes.speculative import choose_k, speculative_generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def torch_decoders(run: Path, unpruned: str):
    flexi = load_checkpoint(run).model
    plain = load_checkpoint(unpruned).model
    return dict(full=TorchDecoder(flexi), draft=TorchDecoder(flexi, skip_slots=True),
                unpruned=TorchDecoder(plain), cost=draft_cost(flexi))


def onnx_decoders(run: Path, unpruned: str, threads: int | None = None):
    """onnxruntime: the run exported with its draft (draft.onnx reads model.onnx.data; both sessions share
    one mapped copy of the weights) and the unpruned model, exported once into runs/exports/spec-onnx/."""
    from flexiedge.exporters.onnx import DRAFT_FILE, export_onnx
    from flexiedge.runtimes.onnxruntime import OrtDecoder, OrtModel, load_pair

    work = ROOT / "runs" / "exports" / "spec-onnx"
    flexi_dir, plain_dir = work / Path(run).name, work / Path(unpruned).name
    if not (flexi_dir / DRAFT_FILE).exists():
        export_onnx(Path(run), flexi_dir, draft=True, overwrite=flexi_dir.exists())
    if not plain_dir.exists():
        export_onnx(Path(unpruned), plain_dir)
    full, draft = load_pair(flexi_dir, threads=threads, tokenizer=False)
    # the same ORT settings as the shared pair (no private pre-packed / folded weight copies), so that
    # time_ratio_vs_unpruned compares architectures, not kernels
    plain = OrtModel.load(plain_dir, threads=threads, tokenizer=False, prepack=False, fold_constants=False)
    return dict(full=OrtDecoder(full), draft=OrtDecoder(draft), unpruned=OrtDecoder(plain),
                cost=draft_cost(load_checkpoint(run).model))


def bench_runtime(name: str, dec: dict, prompts, new_tokens: int, ks) -> tuple[list[dict], bool]:
    rows, identical = [], True
    plain_times, unpruned_times = [], []
    spec_times = {k: [] for k in ks}
    stats_by_k = {k: [] for k in ks}
    for prompt in prompts:  # interleave every configuration per prompt, so load drifts hit all alike
        reference, t = timed(lambda: greedy_generate(dec["full"], prompt, new_tokens))
        plain_times.append(t)
        _, t = timed(lambda: greedy_generate(dec["unpruned"], prompt, new_tokens))
        unpruned_times.append(t)
        for k in ks:
            (out, stats), t = timed(lambda: speculative_generate(dec["full"], dec["draft"], prompt, new_tokens, k))
            identical &= out == reference
            spec_times[k].append(t)
            stats_by_k[k].append(stats)
    plain, unpruned = statistics.median(plain_times), statistics.median(unpruned_times)
    for k in ks:
        drafted = sum(s.drafted for s in stats_by_k[k])
        accepted = sum(s.accepted for s in stats_by_k[k])
        rounds = sum(s.rounds for s in stats_by_k[k])
        generated = sum(s.generated for s in stats_by_k[k])
        spec = statistics.median(spec_times[k])
        rows.append(dict(runtime=name, k=k, acceptance_rate=accepted / drafted, tokens_per_verify=generated / rounds,
                         time_ratio_vs_plain_flexigpt=spec / plain, time_ratio_vs_unpruned=spec / unpruned,
                         plain_flexigpt_over_unpruned=plain / unpruned))
    return rows, identical


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "runs" / "smollm2-30"))
    parser.add_argument("--unpruned", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--runtimes", nargs="+", default=["torch"])
    args = parser.parse_args()

    tokenizer = load_checkpoint(args.run).tokenizer
    text = tokenize_texts(tokenizer, EVAL_TEXTS).tolist()
    step = len(text) // (args.prompts + 1)
    prompts = [text[i * step:i * step + args.prompt_tokens] for i in range(1, args.prompts + 1)]

    all_rows, identical, summary = [], True, {}
    for runtime in args.runtimes:
        decoders = {"torch": torch_decoders, "onnx": onnx_decoders}[runtime](Path(args.run), args.unpruned)
        rows, same = bench_runtime(runtime, decoders, prompts, args.new_tokens, args.ks)
        identical &= same
        all_rows += rows
        best = min(rows, key=lambda r: r["time_ratio_vs_plain_flexigpt"])
        summary[f"decode_time_ratio_vs_plain_flexigpt_{runtime}"] = best["time_ratio_vs_plain_flexigpt"]
        summary[f"decode_time_ratio_vs_unpruned_{runtime}"] = best["time_ratio_vs_unpruned"]
        summary[f"best_k_{runtime}"] = best["k"]
        summary[f"auto_k_{runtime}"] = choose_k(statistics.mean(r["acceptance_rate"] for r in rows), decoders["cost"])
        if runtime == "torch":
            summary["best_k"] = best["k"]
            summary["acceptance_rate_best_k"] = best["acceptance_rate"]
    summary["greedy_identical"] = identical
    summary.setdefault("decode_time_ratio_vs_plain_flexigpt_onnx", None)
    table = markdown_table(all_rows, list(all_rows[0]))
    print(table)
    print(summary)
    settings = dict(run=args.run, unpruned=args.unpruned, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                    new_tokens=args.new_tokens, ks=args.ks, runtimes=args.runtimes, greedy=True,
                    prompt_text=list(EVAL_TEXTS))
    write_result("speculative", summary, settings, dict(rows=all_rows), table)


if __name__ == "__main__":
    main()
