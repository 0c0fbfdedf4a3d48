"""Human-readable summaries of a run: slot map, stored vs computed parameters, savings."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import read_metadata
from .plan import Plan


def storage_summary(checkpoint) -> dict:
    params = checkpoint.metadata.get("parameters")
    if params is None:  # a plain model: everything is stored once
        n = sum(p.numel() for p in checkpoint.model.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in checkpoint.model.parameters())
        return dict(stored=n, stored_bytes=nbytes, computed=n, source=n, stored_ratio=1.0)
    return params


def describe_run(run: Path) -> tuple[str, dict]:
    metadata = read_metadata(Path(run))
    plan = Plan.from_json(metadata["plan"])
    p = metadata["parameters"]
    n, total = len(plan.pruned), plan.num_source_layers
    if plan.method == "extend":
        lines = [f"run {run}: extend, {total} -> {len(plan.layers)} layers ({len(plan.slots)} repeats)"]
    else:
        lines = [f"run {run}: {plan.method}, {n} of {total} blocks pruned ({n / total:.1%})"]
    if plan.block_influence:
        bi = ", ".join(f"{b}:{plan.block_influence[b]:.4f}" for b in plan.pruned)
        lines.append(f"  pruned blocks (block: BI)   {bi}")
    # position of each slot -> the source block whose weights it runs (positions are block numbers
    # after pruning with slots, and stack positions after extension)
    slot_map = {s: plan.layers[plan.layers[s].shares].source_block for s in plan.slots}
    if slot_map:
        lines.append("  slot map (slot <- base)     " + ", ".join(f"{s}<-{b}" for s, b in slot_map.items()))
        ranks = sorted({plan.layers[s].rank for s in plan.slots})
        lines.append(f"  adapter rank {'/'.join(map(str, ranks))}, output norm "
                     f"{'on (gamma0=' + str(plan.output_norm_init) + ')' if plan.output_norm else 'off'}")
    lines += [
        f"  stored parameters           {p['stored']:,} ({p['stored_ratio']:.3f} of the source's {p['source']:,})",
        f"  stored bytes                {p['stored_bytes']:,} ({p['stored_bytes'] / 2**20:.1f} MiB)",
        f"  parameters computed with    {p['computed']:,} (shared weights counted once per use)",
    ]
    data = dict(method=plan.method, pruned=plan.pruned, num_source_layers=total, prune_ratio=n / total,
                slot_map=slot_map, parameters=p)
    return "\n".join(lines), data
