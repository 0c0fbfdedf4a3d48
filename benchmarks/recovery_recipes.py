"""Recovery recipes: which FlexiGPT recovery recipe beats ShortGPT+LoRA at budgets users can afford (SmolLM2-135M, 30%).

    nice -n 5 python benchmarks/recovery_recipes.py --variants unpruned shortgpt_lora paper flexiedge   # one queue
    nice -n 5 python benchmarks/recovery_recipes.py --variants shortgpt_lora_distill kept_only ...     # another
    nice -n 5 python benchmarks/recovery_recipes.py --budgets 20480 --schedule-tokens 20480 --variants slots_kept
    nice -n 5 python benchmarks/recovery_recipes.py --report      # json + md table from what is measured

Every variant starts from the one Block Influence scoring in runs/smollm2-30 (the same 9 pruned blocks), trains
with the same data order (seed 0, seq 128, batch 4, lr 4e-3, one cosine schedule over the largest budget; the
smaller budgets are that run stopped there), and is scored on alice29 (never trained on). Results accumulate in
benchmarks/results/recovery_recipes.partial.json, so queues can run one after another or side by side.

Variants (trainable parameters ~2.95M each, the kept-LoRA rank is matched to the slot adapters):
  shortgpt_lora          plain removal + LoRA r=14 on the 21 kept blocks, next-token loss (the baseline)
  shortgpt_lora_distill  the baseline trained on KL to the unpruned model (same cached teacher)
  paper                  FlexiGPT, the paper's recipe (`--recipe paper`): gamma 0.01, next-token loss
  warm                   paper + block-local warm start (closed-form gammas), next-token loss
  warm_fit               paper + warm start with 40 Adam steps per slot on the block-local error
  flexiedge              warm start + distillation (the default recipe)
  flexiedge_gamma_lr     flexiedge with the gammas/norms at 10x the learning rate
  slots_kept             slots r=16 + kept-block LoRA r=7 (same trainable count), warm start + distillation
  kept_only              slots r=32 warm-started then frozen + kept-block LoRA r=14, distillation
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, markdown_table, write_result  # noqa: E402
from recovery import held_out_ppl  # noqa: E402

PARTIAL = RESULTS / "recovery_recipes.partial.json"
NAME = "recovery_recipes"
BASE = dict(seq_len=128, batch_size=4, lr=4e-3, eval_every=0, eval_sequences=4, save_every=0, seed=0)
WARM = dict(warm_start_tokens=2048, warm_start_steps=0)
VARIANTS = {  # name -> (source run, TrainConfig fields)
    "shortgpt_lora": ("shortgpt", dict(recipe="paper", kept_lora=14)),
    "shortgpt_lora_distill": ("shortgpt", dict(recipe="paper", kept_lora=14, distill=1.0)),
    "paper": ("flexigpt", dict(recipe="paper")),
    "warm": ("flexigpt", dict(recipe="paper", **WARM)),
    "warm_fit": ("flexigpt", dict(recipe="paper", warm_start_tokens=2048, warm_start_steps=40)),
    "flexiedge": ("flexigpt", dict(recipe="flexiedge", **WARM)),
    "flexiedge_gamma_lr": ("flexigpt", dict(recipe="flexiedge", norm_lr_scale=10.0, **WARM)),
    "slots_kept": ("flexigpt_r16", dict(recipe="flexiedge", kept_lora=7, **WARM)),
    "kept_only": ("flexigpt", dict(recipe="flexiedge", kept_lora=14, train_slots=False, **WARM)),
}
FLEXI = ("paper", "warm", "warm_fit", "flexiedge", "flexiedge_gamma_lr", "slots_kept", "kept_only")


def load_partial() -> dict:
    return json.loads(PARTIAL.read_text()) if PARTIAL.exists() else {}


def update_partial(name: str, values: dict) -> None:
    """Merge one variant's new numbers (re-read first: another queue may have written meanwhile)."""
    done = load_partial()
    done.setdefault(name, {}).update(values)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = PARTIAL.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, indent=2))
    tmp.replace(PARTIAL)


def source_runs(flexi_run: Path, work: Path) -> dict[str, Path]:
    """ShortGPT and rank-16 FlexiGPT checkpoints built from the FlexiGPT run's own plan (no re-scoring)."""
    from flexiedge.checkpoint import read_metadata, save_checkpoint
    from flexiedge.models import load_model
    from flexiedge.plan import Plan, PruneConfig, make_plan
    from flexiedge.prune import variant

    meta = read_metadata(flexi_run)
    plan = Plan.from_json(meta["plan"])
    bases = {plan.layers[p].source_block: plan.layers[plan.layers[p].shares].source_block for p in plan.slots}
    runs = dict(flexigpt=flexi_run, shortgpt=work / "smollm2-30-shortgpt", flexigpt_r16=work / "smollm2-30-r16")
    changes = dict(shortgpt=dict(method="shortgpt"), flexigpt_r16=dict(rank=16))
    model = tokenizer = None
    for name, change in changes.items():
        if runs[name].exists():
            continue
        if model is None:
            model, tokenizer = load_model(meta["provenance"]["source_folder"])
        config = PruneConfig(**dict(meta["plan"]["config"], **change))
        new_plan = make_plan(config, plan.block_influence, plan.pruned, None if name == "shortgpt" else bases)
        provenance = dict(meta["provenance"], built_by="benchmarks/recovery_recipes.py from " + str(flexi_run))
        save_checkpoint(variant(model, new_plan, config), tokenizer, new_plan, runs[name], provenance)
    return runs


def run_variant(name: str, source: Path, out: Path, budgets: list[int], schedule_tokens: int, eval_tokens: int,
                key: str | None = None) -> None:
    """PPL at 0 and at each budget of one cosine run over `schedule_tokens` (stop, evaluate, resume)."""
    from flexiedge.recover import read_log, recover
    from flexiedge.train_config import TrainConfig

    fields = dict(BASE, **VARIANTS[name][1])
    config = TrainConfig(tokens=schedule_tokens, **fields)
    name = key or name  # the partial-results row (a longer schedule is its own row)
    row = load_partial().get(name, {})
    if "0" not in row:
        t0 = time.perf_counter()
        recover(source, out, config, overwrite=True, stop_after=0)  # warm start (if any), no training
        start_s = time.perf_counter() - t0
        warm = json.loads((out / "flexiedge.json").read_text())["provenance"]["recovery"].get("warm_start")
        update_partial(name, {"0": held_out_ppl(out, eval_tokens), "init_seconds": start_s, "warm_start": warm})
    per_step = config.tokens_per_step()
    for budget in budgets:
        if str(budget) in load_partial().get(name, {}):
            continue
        steps = -(-budget // per_step)
        done_steps = read_log(out)[-1]["step"] if read_log(out) else 0
        print(f"[{name}] training to {budget} tokens (step {steps})", flush=True)
        recover(source, out, config, resume=True, stop_after=steps - done_steps)
        log = read_log(out)
        meta = json.loads((out / "flexiedge.json").read_text())
        update_partial(name, {str(budget): held_out_ppl(out, eval_tokens),
                              "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in log),
                              "stored_bytes": meta["parameters"]["stored_bytes"],
                              "trainable_parameters": meta["provenance"]["recovery"]["trainable_parameters"],
                              "config": meta["provenance"]["recovery"]["config"]})


def report(budgets: list[int], eval_tokens: int, schedule_tokens: int) -> None:
    """Table + summary. Rows NAME@S (a longer cosine schedule over S tokens, run for the top contenders only)
    extend the budget axis; the summary's max budget is the largest one both the baseline and a FlexiGPT recipe reached."""
    done = load_partial()
    names = [n for n in done if n.split("@")[0] in VARIANTS]
    all_budgets = sorted({int(k) for n in names for k in done[n] if k.isdigit() and k != "0"})
    keys = ["0", *map(str, all_budgets)]
    rows = []
    for name in names:
        r = done[name]
        row = {"variant": name, "trainable params": r.get("trainable_parameters", ""),
               "stored MiB": round(r["stored_bytes"] / 2**20, 2) if "stored_bytes" in r else "",
               "train tok/s": round(r["tokens_per_s_median"], 1) if "tokens_per_s_median" in r else ""}
        for k in keys:
            row[f"PPL@{k}"] = round(r[k], 2) if k in r else "-"
        rows.append(row)
    table = markdown_table(rows, ["variant", "trainable params", "stored MiB", *[f"PPL@{k}" for k in keys],
                                  "train tok/s"])
    # Compare within one schedule: rows NAME (the standard schedule) or NAME@S share a suffix.
    def ppl(name, budget):
        return done.get(name, {}).get(str(budget))

    groups = sorted({"@" + n.split("@")[1] if "@" in n else "" for n in names})
    pairs = []  # (budget, suffix, baseline ppl, best flexigpt ppl, best flexigpt row)
    for suffix in groups:
        for b in all_budgets:
            base = ppl("shortgpt_lora" + suffix, b)
            flexi = [(ppl(f + suffix, b), f + suffix) for f in FLEXI if ppl(f + suffix, b) is not None]
            if base is not None and flexi:
                pairs.append((b, suffix, base, *min(flexi)))
    top = max((p[0] for p in pairs), default=None)
    low = min((p[0] for p in pairs), default=None)
    at_top = min((p for p in pairs if p[0] == top), key=lambda p: p[3], default=None)  # best schedule at max
    at_low = min((p for p in pairs if p[0] == low), key=lambda p: p[3], default=None)
    best = at_top[4] if at_top else None
    best_low = ppl(best, low) or ppl(best.split("@")[0], low) if best else None
    paper_top = next((ppl(n, top) for n in names if n.split("@")[0] == "paper" and ppl(n, top) is not None), None)
    summary = dict(
        budget_tokens_max=top, ppl_shortgpt_lora_at_max=at_top[2] if at_top else None,
        ppl_paper_recipe_at_max=paper_top, ppl_best_recipe_at_max=at_top[3] if at_top else None,
        best_recipe=best, ppl_warm_start_0_tokens=done.get("flexiedge", {}).get("0"),
        ppl_best_over_shortgpt_lora_min_budget=(best_low / at_low[2]) if best_low and at_low else None,
        ppl_best_over_shortgpt_lora_max_budget=(at_top[3] / at_top[2]) if at_top else None,
        budget_tokens_min=low, ppl_unpruned=done.get("unpruned", {}).get("0"),
        best_flexigpt_over_shortgpt_lora_per_budget={f"{b}{sfx or ''}": round(f / base, 4) for b, sfx, base, f, _ in pairs},
        best_flexigpt_row_per_budget={f"{b}{sfx or ''}": row for b, sfx, _, _, row in pairs},
        beats_shortgpt_lora_by_5pct_at_every_budget=all(f <= 0.95 * base for _, _, base, f, _ in pairs) if pairs else None)
    settings = dict(BASE, budgets=budgets, schedule_tokens=schedule_tokens, eval_text="alice29",
                    eval_tokens=eval_tokens, eval_context=512, train_texts=["plrabn12", "asyoulik", "botchan"],
                    warm_start_text="lcet10", variants={k: v[1] for k, v in VARIANTS.items()},
                    schedule="one cosine run per row over schedule_tokens (NAME@S rows: over S); budgets are that "
                             "run stopped early")
    notes = ("PPL on the first {} tokens of alice29 (context 512); unpruned SmolLM2-135M: {}. Budgets are stops of "
             "one cosine schedule over {} tokens. A '-' means not run (machine load: 2 shared cores). "
             "Trainable parameters and stored bytes: see columns (kept_only stores its frozen r=32 slot adapters "
             "on top of the kept-block LoRA: +11.4 MiB, 2.8%). Rows NAME@S: a separate cosine run over S tokens. "
             "train tok/s is the median step rate of each run and mostly reflects the shared machine's load at the "
             "time (2 cores, other jobs), not the recipe; warm-start and teacher costs are not in it (init_seconds "
             "and the distillation teacher's first pass are in the json).".format(eval_tokens, _fmt(done.get("unpruned", {}).get("0")),
                                                       schedule_tokens))
    diag = done.get("diagnostics")
    if diag:
        notes += "\n\nStart PPL of the slot inits (0 tokens): " + ", ".join(
            f"{k.removeprefix('ppl_')} {v:.2f}" for k, v in diag.items() if k.startswith("ppl_")) + "."
    write_result(NAME, summary, settings, dict(variants=done), table + "\n\n" + notes)
    print(table)
    print(json.dumps(summary, indent=2))


def _fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "smollm2-30"))
    parser.add_argument("--work", default=str(ROOT / "runs"))
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS) + ["unpruned"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--stop-at", type=int, help="train this queue's variants only up to this budget")
    parser.add_argument("--schedule-tokens", type=int, help="length of the cosine schedule (default: largest budget)")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, help="torch threads for this queue")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = sorted(args.budgets)
    schedule = args.schedule_tokens or budgets[-1]
    runs = source_runs(Path(args.run), Path(args.work))
    for name in args.variants:
        if name == "unpruned":
            if "0" not in load_partial().get("unpruned", {}):
                from flexiedge.checkpoint import read_metadata
                folder = read_metadata(runs["flexigpt"])["provenance"]["source_folder"]
                update_partial("unpruned", {"0": held_out_ppl(Path(folder), args.eval_tokens)})
            continue
        mine = [b for b in budgets if args.stop_at is None or b <= args.stop_at]
        key = f"{name}@{schedule}" if args.schedule_tokens else None
        run_variant(name, runs[VARIANTS[name][0]], Path(args.work) / f"recipes-{key or name}", mine, schedule,
                    args.eval_tokens, key)
    if args.report:
        report(budgets, args.eval_tokens, schedule)


if __name__ == "__main__":
    main()
