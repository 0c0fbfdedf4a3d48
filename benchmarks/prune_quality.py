"""Quality right after pruning (no recovery): SmolLM2-135M at 30% and 40% of blocks.

    python benchmarks/prune_quality.py                 # ~15 min on 2 cores
    python benchmarks/prune_quality.py --eval-tokens 2048 --ratios 0.3   # a quick look

Unpruned, ShortGPT, FlexiGPT start PPL and the paper's three ablations (no output norm, no SVD init,
high-rank base selection), stored parameters vs unpruned, and the slot map each selection picks.
Calibration text (lcet10) and evaluation text (alice29) are disjoint.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Python puts this folder first on sys.path, where benchmarks/{gguf,onnx}.py would shadow those packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from common import markdown_table, write_result  # noqa: E402

from flexiedge.checkpoint import stored_tensors  # noqa: E402
from flexiedge.data import EVAL_TEXTS, tokenize_texts  # noqa: E402
from flexiedge.evaluate import perplexity  # noqa: E402
from flexiedge.models import DEFAULT_MODEL, load_model  # noqa: E402
from flexiedge.plan import PruneConfig, make_plan  # noqa: E402
from flexiedge.prune import CalibrationConfig, apply_plan, plan_pruning, score_blocks  # noqa: E402

VARIANTS = {  # name -> PruneConfig overrides
    "shortgpt": dict(method="shortgpt"),
    "flexigpt_start": dict(),
    "no_output_norm_start": dict(output_norm=False),
    "no_svd_init_start": dict(svd_init=False),
    "highrank_select_start": dict(selection="frobenius"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.4])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    args = parser.parse_args()

    source, tokenizer = load_model(args.model)
    source_params = sum(p.numel() for p in source.parameters())
    eval_ids = tokenize_texts(tokenizer, EVAL_TEXTS)
    calibration = CalibrationConfig(tokens=args.calib_tokens)
    scores, calib_info = score_blocks(source, tokenizer, calibration)

    def ppl(model):
        return perplexity(model, eval_ids, context=512, max_tokens=args.eval_tokens)

    unpruned = ppl(source)
    summary = dict(ppl_unpruned=unpruned.ppl)
    rows = [dict(variant="unpruned", ratio=0.0, ppl=unpruned.ppl, stored_params=source_params, stored_ratio=1.0)]
    details = dict(block_influence=scores, variants={})
    bases_by_selection: dict = {}

    def plan_for(config: PruneConfig):
        """The plan, with the base choice (the SVDs) computed once per ratio and selection metric."""
        key = (config.ratio, config.selection)
        if config.method == "flexigpt" and key in bases_by_selection:
            pruned, bases = bases_by_selection[key]
            return make_plan(config, scores, pruned, bases)
        plan = plan_pruning(source, scores, config)
        if config.method == "flexigpt":
            bases_by_selection[key] = (plan.pruned, {plan.layers[p].source_block: plan.layers[p].shares
                                                     for p in plan.slots})
        return plan

    for ratio in args.ratios:
        tag = f"{round(ratio * 100)}"
        for name, overrides in VARIANTS.items():
            config = replace(PruneConfig(ratio=ratio, rank=args.rank), **overrides)
            plan = plan_for(config)
            model = apply_plan(copy.deepcopy(source), plan, config)
            result = ppl(model)
            stored = sum(t.numel() for t in stored_tensors(model, plan).values())
            slot_map = {plan.layers[s].source_block: plan.layers[plan.layers[s].shares].source_block
                        for s in plan.slots}
            summary[f"ppl_{name}_{tag}"] = result.ppl
            if name == "flexigpt_start":
                summary[f"stored_param_ratio_{tag}"] = stored / source_params
            if name == "shortgpt":
                summary[f"stored_param_ratio_shortgpt_{tag}"] = stored / source_params
            rows.append(dict(variant=name, ratio=ratio, ppl=result.ppl, stored_params=stored,
                             stored_ratio=stored / source_params,
                             slot_map=", ".join(f"{s}<-{b}" for s, b in slot_map.items()) or "-"))
            details["variants"][f"{name}_{tag}"] = dict(ppl=result.as_dict(), pruned=plan.pruned, slot_map=slot_map,
                                                        stored_params=stored, stored_bytes=stored * 4)
            print(f"{name:24s} {ratio:.0%}: PPL {result.ppl:9.2f}  stored {stored / source_params:.3f}", flush=True)
            del model
    summary["eval_tokens"] = unpruned.tokens
    table = markdown_table(rows, ["variant", "ratio", "ppl", "stored_params", "stored_ratio", "slot_map"])
    print(table)
    settings = dict(model=args.model, ratios=args.ratios, rank=args.rank, eval_texts=list(EVAL_TEXTS),
                    eval_context=512, calibration=calib_info)
    write_result("prune_quality", summary, settings, details, table)


if __name__ == "__main__":
    main()
