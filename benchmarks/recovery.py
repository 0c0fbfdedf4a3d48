"""Recovery benchmark: FlexiGPT vs ShortGPT+LoRA at equal tokens and equal trainable parameters (SmolLM2-135M, 30%).

    nice -n 5 python benchmarks/recovery.py                       # -> benchmarks/results/recovery.{json,md}
    nice -n 5 python benchmarks/recovery.py --tokens 10240 20480 --eval-tokens 4096

Variants, all from the one Block Influence scoring stored in runs/smollm2-30 (same 9 pruned blocks):
  flexigpt          the paper's recipe (slots share a base, SVD-initialised LoRA r=32, output norms)
  shortgpt_lora     plain removal + LoRA on the 21 kept blocks, rank chosen to match flexigpt's trainable count
  no_output_norm    flexigpt without output feature normalisation (ablation)
  no_svd_init       flexigpt with random-A / zero-B adapters (ablation)
Each variant trains once with a cosine schedule over the largest budget; the smaller budgets are the same
run stopped there (`stop_after`, then `--resume`): an intermediate point of a longer schedule, not a
separately scheduled short run. Held-out PPL is on alice29 (never trained on: training uses TRAIN_TEXTS).
Intermediate results are kept in benchmarks/results/recovery.partial.json, so a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from flexiedge.plan import PROJECTIONS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PARTIAL = RESULTS / "recovery.partial.json"
VARIANTS = ("flexigpt", "shortgpt_lora", "no_output_norm", "no_svd_init")


def build_variants(flexi_run: Path, work: Path) -> dict[str, Path]:
    """The ShortGPT and ablation checkpoints, built from the FlexiGPT run's own plan (no re-scoring)."""
    from flexiedge.checkpoint import read_metadata, save_checkpoint
    from flexiedge.models import load_model
    from flexiedge.plan import Plan, PruneConfig, make_plan
    from flexiedge.prune import variant

    meta = read_metadata(flexi_run)
    plan = Plan.from_json(meta["plan"])
    source = meta["provenance"]["source_folder"]
    bases = {plan.layers[p].source_block: plan.layers[plan.layers[p].shares].source_block for p in plan.slots}
    base_config = dict(meta["plan"]["config"])
    configs = dict(shortgpt=dict(method="shortgpt"), no_output_norm=dict(output_norm=False),
                   no_svd_init=dict(svd_init=False))
    runs = dict(flexigpt=flexi_run)
    model = tokenizer = None
    for name, change in configs.items():
        out = work / f"smollm2-30-{name}"
        runs[name] = out
        if out.exists():
            continue
        if model is None:
            model, tokenizer = load_model(source)
        config = PruneConfig(**dict(base_config, **change))
        new_plan = make_plan(config, plan.block_influence, plan.pruned, None if name == "shortgpt" else bases)
        torch.manual_seed(0)  # the no-SVD-init adapters' random A
        provenance = dict(meta["provenance"], built_by="benchmarks/recovery.py from " + str(flexi_run))
        save_checkpoint(variant(model, new_plan, config), tokenizer, new_plan, out, provenance)
    return runs


def matching_kept_rank(flexi_run: Path, shortgpt_run: Path, slot_norms: bool = True) -> tuple[int, int, int]:
    """Kept-LoRA rank whose trainable count is closest to FlexiGPT's: (rank, flexi count, shortgpt count)."""
    from flexiedge.checkpoint import load_checkpoint
    from flexiedge.recover import trainable_names

    flexi = load_checkpoint(flexi_run)
    params = dict(flexi.model.named_parameters())
    target = sum(params[n].numel() for n in trainable_names(flexi.model, flexi.plan, slot_norms))
    short = load_checkpoint(shortgpt_run)
    per_rank = sum(layer.get_submodule(n).in_features + layer.get_submodule(n).out_features
                   for layer in short.model.model.layers for n in PROJECTIONS)
    rank = max(1, round(target / per_rank))
    return rank, target, rank * per_rank


def held_out_ppl(run: Path, eval_tokens: int) -> float:
    from flexiedge.checkpoint import load_checkpoint
    from flexiedge.data import EVAL_TEXTS, tokenize_texts
    from flexiedge.evaluate import perplexity

    ckpt = load_checkpoint(run)
    ids = tokenize_texts(ckpt.tokenizer, EVAL_TEXTS)
    return perplexity(ckpt.model, ids, context=512, max_tokens=eval_tokens, progress=False).ppl


def recovery_curve(name: str, run: Path, out: Path, budgets: list[int], config_fields: dict, eval_tokens: int,
                   done: dict, partial: Path = PARTIAL) -> dict:
    """PPL at 0 and at each budget of one cosine run over the largest budget (stop, evaluate, resume)."""
    from flexiedge.recover import read_log, recover
    from flexiedge.train_config import TrainConfig

    row = done.setdefault(name, {})
    if "0" not in row:
        row["0"] = held_out_ppl(run, eval_tokens)
        _save_partial(done, partial)
    config = TrainConfig(tokens=max(budgets), **config_fields)
    per_step = config.tokens_per_step()
    for budget in budgets:
        if str(budget) in row:
            continue
        steps = -(-budget // per_step)
        resume = out.exists()
        state_step = read_log(out)[-1]["step"] if resume else 0
        print(f"[{name}] training to {budget} tokens (step {steps})", flush=True)
        recover(run, out, config, resume=resume, stop_after=steps - state_step)
        row[str(budget)] = held_out_ppl(out, eval_tokens)
        _save_partial(done, partial)
    log = read_log(out)
    row["tokens_per_s_median"] = statistics.median(r["tokens_per_s"] for r in log)
    meta = json.loads((out / "flexiedge.json").read_text())
    row["stored_bytes"] = meta["parameters"]["stored_bytes"]
    row["trainable_parameters"] = meta["provenance"]["recovery"]["trainable_parameters"]
    _save_partial(done, partial)
    return row


def throughput_ratio(flexi_run: Path, config_fields: dict, steps: int = 3) -> dict:
    """Recovery step vs a plain forward+backward of the unpruned model, same batches, interleaved in one run."""
    from flexiedge.distributed import Single
    from flexiedge.recover import new_session, train_step
    from flexiedge.train_config import TrainConfig
    from flexiedge.models import load_model
    from flexiedge.checkpoint import read_metadata
    from flexiedge.recover import batch_at

    config = TrainConfig(tokens=10**9, **config_fields)
    session = new_session(flexi_run, config, Single())
    full, _ = load_model(read_metadata(flexi_run)["provenance"]["source_folder"])
    full.train()
    rec_t, full_t = [], []
    for step in range(steps + 1):  # step 0 warms both up and is not counted
        t0 = time.perf_counter()
        train_step(session, torch.device("cpu"), None)
        t1 = time.perf_counter()
        batch = batch_at(session.data, config, step, 0)
        full(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        full.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step:
            rec_t.append(t1 - t0)
            full_t.append(t2 - t1)
    tokens = config.tokens_per_step()
    rec, unp = tokens / statistics.median(rec_t), tokens / statistics.median(full_t)
    return dict(recovery_tokens_per_s=rec, unpruned_fwd_bwd_tokens_per_s=unp, ratio=rec / unp, steps=steps,
                note="ratio = recovery tokens/s / unpruned full forward+backward tokens/s (>1: recovery is faster)")


def _save_partial(done: dict, partial: Path = PARTIAL) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(done, indent=2))


def markdown(result: dict) -> str:
    budgets = result["settings"]["budgets"]
    lines = ["| variant | trainable params | stored MiB | " + " | ".join(f"PPL @ {b} tok" for b in ["0", *map(str, budgets)])
             + " | train tok/s |", "|---" * (len(budgets) + 5) + "|"]
    for name in VARIANTS:
        row = result["curves"][name]
        ppl = " | ".join(f"{row[k]:.2f}" for k in ["0", *map(str, budgets)])
        lines.append(f"| {name} | {row['trainable_parameters']:,} | {row['stored_bytes'] / 2**20:.1f} | {ppl} | "
                     f"{row['tokens_per_s_median']:.0f} |")
    t = result["throughput"]
    lines.append("")
    lines.append(f"Recovery {t['recovery_tokens_per_s']:.0f} tok/s vs unpruned forward+backward "
                 f"{t['unpruned_fwd_bwd_tokens_per_s']:.0f} tok/s: ratio {t['ratio']:.2f}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import transformers
    import flexiedge

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "smollm2-30"))
    parser.add_argument("--work", default=str(ROOT / "runs"), help="where variant and recovered runs go")
    parser.add_argument("--tokens", type=int, nargs="+", default=[10240, 20480])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-3)
    args = parser.parse_args(argv)
    flexi_run, work = Path(args.run), Path(args.work)
    budgets = sorted(args.tokens)
    # This is the paper's comparison, so every variant trains with the paper's recipe (plain next-token
    # loss, no warm start); benchmarks/recovery_recipes.py compares the other recipes.
    fields = dict(seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, eval_every=0, eval_sequences=4,
                  save_every=0, recipe="paper")
    started = time.time()
    done = json.loads(PARTIAL.read_text()) if PARTIAL.exists() else {}
    runs = build_variants(flexi_run, work)
    rank, flexi_count, short_count = matching_kept_rank(flexi_run, runs["shortgpt"])
    sources = dict(flexigpt=(runs["flexigpt"], {}), shortgpt_lora=(runs["shortgpt"], dict(kept_lora=rank)),
                   no_output_norm=(runs["no_output_norm"], {}), no_svd_init=(runs["no_svd_init"], {}))
    curves = {}
    for name, (run, extra) in sources.items():
        curves[name] = recovery_curve(name, run, work / f"smollm2-30-{name}-rec", budgets, dict(fields, **extra),
                                      args.eval_tokens, done)
    if "throughput" not in done:
        done["throughput"] = throughput_ratio(flexi_run, fields)
        _save_partial(done)
    top = str(budgets[-1])
    result = dict(
        command="nice -n 5 python benchmarks/recovery.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings=dict(budgets=budgets, eval_text="alice29", eval_tokens=args.eval_tokens, context=512,
                      train_texts=["plrabn12", "asyoulik", "botchan"], schedule="one cosine run over the largest "
                      "budget; smaller budgets are that run stopped early", **fields,
                      kept_lora_rank=rank, trainable_flexigpt=flexi_count, trainable_shortgpt_lora=short_count),
        curves=curves, throughput=done["throughput"], zeroshot=done.get("zeroshot"),
        versions=dict(flexiedge=flexiedge.__version__, torch=torch.__version__, transformers=transformers.__version__,
                      python=platform.python_version()),
        machine=dict(platform=platform.platform(), processor=platform.processor(), threads=torch.get_num_threads()),
        wall_s=time.time() - started)
    zs = done.get("zeroshot") or {}
    result["summary"] = dict(
        recovery_tokens=budgets[-1],
        ppl_flexigpt_rec_30=curves["flexigpt"][top], ppl_shortgpt_lora_rec_30=curves["shortgpt_lora"][top],
        ppl_no_output_norm_rec_30=curves["no_output_norm"][top], ppl_no_svd_init_rec_30=curves["no_svd_init"][top],
        acc_social_iqa_flexigpt_30=zs.get("flexigpt"), acc_social_iqa_shortgpt_lora_30=zs.get("shortgpt_lora"),
        recovery_tokens_per_s_ratio=done["throughput"]["ratio"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "recovery.md").write_text(markdown(result))
    print(markdown(result))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
