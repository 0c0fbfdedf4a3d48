"""Recovery recipes: which FlexiGPT recovery recipe beats ShortGPT+LoRA at budgets users can afford (SmolLM2-135M, 30%).

    nice -n 5 python benchmarks/recovery_recipes.py --variants unpruned shortgpt_lora paper flexiedge   # one queue
    nice -n 5 python benchmarks/recovery_recipes.py --variants shortgpt_lora_distill kept_only ...     # another
    nice -n 5 python benchmarks/recovery_recipes.py --budgets 20480 --schedule-tokens 20480 --variants slots_kept
    nice -n 5 python benchmarks/recovery_recipes.py --variants functional energy slots_kept_functional ...
    nice -n 5 python benchmarks/recovery_recipes.py --budgets 20480 40960 --schedule-tokens 40960 --variants energy
    nice -n 5 python benchmarks/recovery_recipes.py --report      # json + md table from what is measured

(prefix OMP_NUM_THREADS=1 when queues share a small machine). The first call builds the source checkpoints
(ShortGPT, r=16, functional bases, energy ranks; ~4 min each functional base choice on 2 cores).

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
  functional             flexiedge on slots whose bases are chosen by function (`PruneConfig.selection="functional"`)
  energy                 flexiedge on slots with per-slot ranks from the difference spectra, same total rank
                         (`PruneConfig.rank_allocation="energy"`)
  slots_kept_recipe      `--recipe slots_kept` on the r=32 run: must reproduce slots_kept (run at 0 tokens)
  slots_kept_functional  `--recipe slots_kept` on the functional-base run
  slots_kept_energy      `--recipe slots_kept` on the energy-rank run
  slots_kept_functional_energy   `--recipe slots_kept` on functional bases with energy ranks
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
from flexiedge.train_config import DEFAULT_RECIPE  # noqa: E402

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
    "functional": ("flexigpt_functional", dict(recipe="flexiedge", **WARM)),
    "energy": ("flexigpt_energy", dict(recipe="flexiedge", **WARM)),
    "slots_kept_recipe": ("flexigpt", dict(recipe="slots_kept", **WARM)),
    "slots_kept_functional": ("flexigpt_functional", dict(recipe="slots_kept", **WARM)),
    "slots_kept_energy": ("flexigpt_energy", dict(recipe="slots_kept", **WARM)),
    "slots_kept_functional_energy": ("flexigpt_functional_energy", dict(recipe="slots_kept", **WARM)),
}
FLEXI = ("paper", "warm", "warm_fit", "flexiedge", "flexiedge_gamma_lr", "slots_kept", "kept_only", "functional",
         "energy", "slots_kept_recipe", "slots_kept_functional", "slots_kept_energy", "slots_kept_functional_energy")
# Source checkpoints other than the FlexiGPT run itself: PruneConfig changes (bases re-chosen only by "functional").
SOURCES = dict(shortgpt=dict(method="shortgpt"), flexigpt_r16=dict(rank=16),
               flexigpt_functional=dict(selection="functional"), flexigpt_energy=dict(rank_allocation="energy"),
               flexigpt_functional_energy=dict(selection="functional", rank_allocation="energy"))


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
    """The other source checkpoints (SOURCES), built from the FlexiGPT run's own Block Influence scores and
    pruned blocks (no re-scoring); a functional base choice runs on the run's own calibration text."""
    from flexiedge.checkpoint import read_metadata

    meta = read_metadata(flexi_run)
    runs = dict(flexigpt=flexi_run, shortgpt=work / "smollm2-30-shortgpt", flexigpt_r16=work / "smollm2-30-r16")
    runs.update({name: work / f"smollm2-30-{name.removeprefix('flexigpt_')}" for name in SOURCES if name not in runs})
    missing = [name for name in SOURCES if not runs[name].exists()]
    if missing:
        build_sources(meta, flexi_run, {name: runs[name] for name in missing})
    return runs


def build_sources(meta: dict, flexi_run: Path, outs: dict[str, Path]) -> None:
    from flexiedge.checkpoint import save_checkpoint
    from flexiedge.models import load_model
    from flexiedge.plan import Plan, PruneConfig, energy_ranks, make_plan
    from flexiedge.prune import CalibrationConfig, calibration_windows, choose_base_blocks, variant

    plan = Plan.from_json(meta["plan"])
    bases = {plan.layers[p].source_block: plan.layers[plan.layers[p].shares].source_block for p in plan.slots}
    model, tokenizer = load_model(meta["provenance"]["source_folder"])
    calib = {k: v for k, v in meta["provenance"]["calibration"].items() if k in ("tokens", "seq_len", "batch_size")}
    windows = calibration_windows(tokenizer, CalibrationConfig(**calib))
    for name, out in outs.items():
        config = PruneConfig(**dict(meta["plan"]["config"], **SOURCES[name]))
        chosen, ranks = None, None
        if config.method == "flexigpt":
            t0 = time.perf_counter()
            chosen = choose_base_blocks(model, plan.pruned, config, windows) if config.selection == "functional" \
                else bases
            ranks = energy_ranks(model.model.layers, chosen, config.rank) if config.rank_allocation == "energy" else None
            print(f"[{name}] bases {chosen} ranks {ranks} ({time.perf_counter() - t0:.0f} s)", flush=True)
        new_plan = make_plan(config, plan.block_influence, plan.pruned, chosen, ranks)
        provenance = dict(meta["provenance"], built_by="benchmarks/recovery_recipes.py from " + str(flexi_run))
        save_checkpoint(variant(model, new_plan, config), tokenizer, new_plan, out, provenance)


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
        best_recipe=best.split("@")[0] if best else None, best_recipe_row=best,
        ppl_warm_start_0_tokens=done.get("flexiedge", {}).get("0"),
        ppl_best_over_shortgpt_lora_min_budget=(best_low / at_low[2]) if best_low and at_low else None,
        ppl_best_over_shortgpt_lora_max_budget=(at_top[3] / at_top[2]) if at_top else None,
        budget_tokens_min=low, ppl_unpruned=done.get("unpruned", {}).get("0"),
        beats_shortgpt_lora_by_5pct_at_every_budget=all(f <= 0.95 * base for _, _, base, f, _ in pairs) if pairs else None)
    for b, sfx, base, f, row in pairs:  # flat keys: per budget (and schedule), the best FlexiGPT row and its ratio
        tag = f"{b}" + (f"_schedule_{sfx[1:]}" if sfx else "")
        summary[f"best_over_shortgpt_lora_at_{tag}"] = round(f / base, 4)
        summary[f"best_row_at_{tag}"] = row
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
    notes += "\n\n" + base_choice_notes(done.get("diagnostics_base_choice")) + "\n\n" + decision_notes(pairs)
    write_result(NAME, summary, settings, dict(variants=done), table + "\n\n" + notes)
    print(table)
    print(json.dumps(summary, indent=2))


def base_choice_notes(diag: dict | None) -> str:
    """What the functional base choice and the energy ranks picked, and the block-local errors behind it."""
    if not diag:
        return ""
    err = diag["block_error"]
    mean = {k: statistics.mean(e[k] for e in err.values()) for k in next(iter(err.values()))}
    return ("Base choice and ranks (rows functional, energy, slots_kept_*; same 9 pruned blocks). Paper low-rank bases "
            f"{diag['lowrank_bases']}; functional bases {diag['functional_bases']}. Energy ranks (total 9 x 32 = 288) "
            f"on the low-rank bases {diag['energy_ranks_lowrank_bases']}, on the functional bases "
            f"{diag['energy_ranks_functional_bases']}. Block-local error of a pruned block whose projections are "
            "W_base + [W_pruned - W_base]_32 (mean over the 9 blocks): "
            + ", ".join(f"{k} {v:.3f}" for k, v in mean.items())
            + " (shortgpt = skipping the block). Every rank-32 corrected base computes something further from the "
            "pruned block than no block at all, so the functional choice can only pick the least harmful base "
            "(here always one of blocks 0-2), and what a slot contributes comes from training, not from the base. "
            "Row slots_kept_recipe (`--recipe slots_kept` on the r=32 run, 0 tokens only) starts at the same PPL as "
            "slots_kept (a separately pruned r=16 run + kept LoRA r=7): halving the SVD adapters is the r=16 prune.")


def decision_notes(pairs: list) -> str:
    ratios = ", ".join(f"{b}{sfx}: {f / base:.3f} ({row})" for b, sfx, base, f, row in pairs)
    wins = bool(pairs) and all(f <= 0.95 * base for _, _, base, f, _ in pairs)
    head = ("Best FlexiGPT row / ShortGPT+LoRA PPL per budget (budget@schedule): " + ratios + ". ")
    if wins:
        return head + "A FlexiGPT recipe wins by >= 5% at every budget."
    return head + DEFAULT_NOTE


# Written from the measured rows above (re-check it when rows change).
DEFAULT_NOTE = (
    f"No FlexiGPT recipe beats ShortGPT+LoRA by >= 5% at every budget. The default recipe is `{DEFAULT_RECIPE}`, "
    "the FlexiGPT recipe that recovered best at every budget (69.18 / 60.18 / 56.83 / 47.07 at 2k / 4k / 8k / 40k "
    "tokens against 73.01 / 64.51 / 63.61 / 54.64 for `--recipe flexiedge`; `--recipe paper` is the published "
    "recipe; the summary's "
    "best_recipe is the best row at the largest budget: slots_kept_energy = `--recipe slots_kept` on a prune with "
    "`rank_allocation=\"energy\"`). Trainable parameters are equal within 1.4% (the baseline has the most) and stored bytes within 0.05% "
    "(kept_only: +2.8%). Measured reasons: (1) FlexiGPT wins only at the smallest budget: at 2,048 tokens the best "
    "rows are 0.88x (kept_only) and 0.89x (slots_kept_functional) of the baseline, at 4,096-8,192 tokens 0.99-1.01x, "
    "at 20,480-40,960 tokens 0.99-1.02x (slots_kept on the r=16, energy-rank and functional-base prunes: 47.07, "
    "46.92, 47.16 vs 46.42 at 40,960); the warm start lowers the start PPL (79-81 vs 89.2), but the baseline's "
    "kept-block LoRA closes that gap within ~4k tokens. (2) The adapter budget has to go to the kept blocks: "
    "slots-only recipes (flexiedge, functional, energy) are 12-13% worse than the baseline at 8,192 tokens and "
    "18% (54.64-54.75 vs 46.42) at 40,960, whatever the base choice or rank split, while slots_kept and kept_only track it. "
    "A rank-32 correction of another block does not recover the pruned block (every corrected base is further from "
    "it than skipping it, block-local errors above), so what the shared base weights add is small. (3) Neither new "
    "setting closes the gap: the energy split of the same 288 ranks moves ranks by at most +-7 and PPL by < 2% "
    "either way (46.92 vs 47.07 with slots_kept at 40,960; 54.66 vs 54.64 with flexiedge); the functional bases help early "
    "(slots_kept: 65.65 vs 69.18 at 2,048 tokens), lose at 8,192 (58.38 vs 56.83) and are even at 40,960 "
    "(47.16 vs 47.07; 54.75 vs 54.64 with flexiedge).")


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
