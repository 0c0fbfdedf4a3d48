"""The plan: which blocks are pruned, which base block each slot shares, ranks. Saved as JSON.

The plan is the single source of truth about sharing: builders, the checkpoint, exporters and runtimes
read it and never infer sharing from equal bytes.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field

import torch

from .errors import FlexiEdgeError
from .lowrank import low_rank_distance, low_rank_factors

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
METHODS = ("flexigpt", "shortgpt")
SELECTIONS = ("lowrank", "frobenius", "functional")
RANK_ALLOCATIONS = ("uniform", "energy")


@dataclass
class PruneConfig:
    """How to prune. Fields map one-to-one onto `flexiedge prune` options."""
    ratio: float | None = 0.3           # fraction of blocks to prune (ignored if `blocks` is set)
    blocks: int | None = None           # explicit number of blocks to prune
    method: str = "flexigpt"            # "flexigpt" (slots share a base) or "shortgpt" (plain removal)
    rank: int = 32                      # LoRA rank of every slot projection
    selection: str = "lowrank"          # base choice: "lowrank" (paper), "frobenius" (high-rank ablation) or
                                        # "functional" (closest output on the pruned block's own inputs)
    selection_rank: int | None = None   # r in the low-rank distance; defaults to `rank`
    svd_init: bool = True               # adapters from the SVD of W_pruned - W_base; else random A, zero B
    output_norm: bool = True            # LayerNorm (no bias) on slot attention/MLP outputs
    output_norm_init: float = 0.01      # gamma's initial value: small, so a slot starts near identity
    protect_ends: bool = True           # never prune the first and the last block
    svd: str = "auto"                   # "exact", "randomized" or "auto" (randomized above 2048 dims)
    selection_tokens: int = 2048        # calibration tokens the functional base choice runs blocks on
    rank_allocation: str = "uniform"    # "uniform" (every slot `rank`) or "energy" (same total, by the spectra
                                        # of W_pruned - W_base)

    def num_to_prune(self, num_layers: int) -> int:
        if self.blocks is not None:
            n = self.blocks
        elif self.ratio is None or not 0 < self.ratio < 1:
            raise FlexiEdgeError(f"--ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        else:
            n = round(self.ratio * num_layers)
        allowed = num_layers - (2 if self.protect_ends else 1)
        if not 1 <= n <= allowed:
            raise FlexiEdgeError(f"cannot prune {n} of {num_layers} blocks: choose between 1 and {allowed}"
                                 + (" (the first and last blocks are protected)" if self.protect_ends else ""))
        return n

    def check(self):
        if self.method not in METHODS:
            raise FlexiEdgeError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.selection not in SELECTIONS:
            raise FlexiEdgeError(f"unknown base selection {self.selection!r}: use one of {', '.join(SELECTIONS)}")
        if self.rank < 0:
            raise FlexiEdgeError(f"--rank must be >= 0, got {self.rank}")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise FlexiEdgeError(f"unknown rank allocation {self.rank_allocation!r}: use one of "
                                 f"{', '.join(RANK_ALLOCATIONS)}")
        if self.selection_tokens < 1:
            raise FlexiEdgeError(f"selection_tokens must be >= 1, got {self.selection_tokens}")


@dataclass
class LayerSpec:
    """One layer of the resulting stack."""
    source_block: int                 # the block of the source model this layer stands for
    shares: int | None = None         # slot: stack position of the layer whose weights it reuses
    rank: int = 0                     # slot: LoRA rank; kept block: rank of its own-weight LoRA (0 = none)

    @property
    def is_slot(self) -> bool:
        return self.shares is not None


@dataclass
class Plan:
    method: str
    num_source_layers: int
    layers: list[LayerSpec]
    pruned: list[int] = field(default_factory=list)
    block_influence: list[float] | None = None
    output_norm: bool = True
    output_norm_init: float = 0.01
    output_norm_eps: float = 1e-5
    config: dict = field(default_factory=dict)

    @property
    def slots(self) -> list[int]:
        return [p for p, spec in enumerate(self.layers) if spec.is_slot]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        data = dict(data)
        data["layers"] = [LayerSpec(**layer) for layer in data["layers"]]
        return cls(**data)

    @classmethod
    def identity(cls, num_layers: int) -> "Plan":
        """The plan of an unpruned model: every block is its own layer."""
        return cls(method="unpruned", num_source_layers=num_layers,
                   layers=[LayerSpec(i) for i in range(num_layers)])


def select_pruned_blocks(scores: list[float], count: int, protect_ends: bool = True) -> list[int]:
    """The `count` blocks with the lowest Block Influence, in block order."""
    candidates = range(1, len(scores) - 1) if protect_ends else range(len(scores))
    ranked = sorted(candidates, key=lambda i: scores[i])
    return sorted(ranked[:count])


def projection_weights(block) -> dict[str, torch.Tensor]:
    return {name: block.get_submodule(name).weight.detach() for name in PROJECTIONS}


def block_distances(layers, pruned: list[int], kept: list[int], rank: int,
                    selection: str = "lowrank", svd: str = "auto") -> dict[int, dict[int, float]]:
    """distance[i][j] between pruned block i and kept block j, summed over the seven projections.

    Each projection's distance is divided by ||What_i||_F (||W_i||_F for frobenius) so that every
    projection counts equally, whatever its size.
    """
    if selection == "frobenius":
        def dist(i, j, name):
            wi, wj = weights[i][name], weights[j][name]
            return float((wi - wj).norm() / wi.norm())
        weights = {b: projection_weights(layers[b]) for b in pruned + kept}
    else:
        factors = {b: block_factors(projection_weights(layers[b]), rank, svd) for b in pruned + kept}
        return low_rank_distances(factors, pruned, kept, rank)
    return {i: {j: sum(dist(i, j, name) for name in PROJECTIONS) for j in kept} for i in pruned}


def block_factors(weights: dict[str, torch.Tensor], rank: int, svd: str = "auto") -> dict[str, tuple]:
    """Rank-r factors (L, R) of each projection of one block: all the base choice needs of it."""
    return {name: low_rank_factors(w, rank, svd) for name, w in weights.items()}


def low_rank_distances(factors: dict[int, dict[str, tuple]], pruned: list[int], kept: list[int],
                       rank: int) -> dict[int, dict[int, float]]:
    """The paper's distance between every pruned and kept block, from their `block_factors`."""
    def dist(i, j, name):
        return low_rank_distance(factors[i][name], factors[j][name], rank) / float(factors[i][name][0].norm())
    return {i: {j: sum(dist(i, j, name) for name in PROJECTIONS) for j in kept} for i in pruned}


def choose_bases(distances: dict[int, dict[int, float]]) -> dict[int, int]:
    """Base block of each pruned block: the kept block at the smallest distance (ties: the nearest index)."""
    return {i: min(row, key=lambda j: (row[j], abs(i - j))) for i, row in distances.items()}


def difference_energy(layers, bases: dict[int, int]) -> dict[int, torch.Tensor]:
    """Per pruned block i: e[k] = sum over projections of s_k^2 / ||W_i||_F^2, s the singular values of W_i - W_base.

    e[:r].sum() is the share of each projection's weight that a rank-r adapter restores (projections count
    equally, as in `block_distances`). Cut at the smallest projection's rank so one slot rank fits all seven.
    """
    energy = {}
    for i, j in bases.items():
        wi, wj = projection_weights(layers[i]), projection_weights(layers[j])
        spectra = [torch.linalg.svdvals(wi[n].float() - wj[n].float()).pow(2) / wi[n].float().pow(2).sum()
                   for n in PROJECTIONS]
        limit = min(len(s) for s in spectra)
        energy[i] = sum(s[:limit] for s in spectra)
    return energy


def allocate_ranks(energy: dict[int, torch.Tensor], budget: int, floor: int = 1) -> dict[int, int]:
    """Ranks summing to `budget` that capture the most energy: each next unit of rank goes to the slot whose
    next singular value carries the most energy (optimal: every spectrum is non-increasing)."""
    limit = {i: len(e) for i, e in energy.items()}
    if budget < floor * len(energy) or budget > sum(limit.values()):
        raise FlexiEdgeError(f"a total rank of {budget} cannot be split over {len(energy)} slots "
                             f"(between {floor * len(energy)} and {sum(limit.values())})")
    ranks = {i: floor for i in energy}
    heap = [(-float(e[floor]), i) for i, e in energy.items() if floor < limit[i]]
    heapq.heapify(heap)
    for _ in range(budget - floor * len(energy)):
        _, i = heapq.heappop(heap)
        ranks[i] += 1
        if ranks[i] < limit[i]:
            heapq.heappush(heap, (-float(energy[i][ranks[i]]), i))
    return ranks


def energy_ranks(layers, bases: dict[int, int], rank: int) -> dict[int, int]:
    """Per-slot ranks from the difference spectra, with the same total (hence adapter parameters) as `rank` each."""
    return allocate_ranks(difference_energy(layers, bases), rank * len(bases))


def make_plan(config: PruneConfig, scores: list[float], pruned: list[int],
              bases: dict[int, int] | None, ranks: dict[int, int] | None = None) -> Plan:
    """`ranks` (pruned block -> rank) overrides `config.rank` per slot."""
    num_layers = len(scores)
    if config.method == "shortgpt":
        layers = [LayerSpec(b) for b in range(num_layers) if b not in pruned]
    else:
        ranks = ranks or {b: config.rank for b in pruned}
        layers = [LayerSpec(b, shares=bases[b], rank=ranks[b]) if b in pruned else LayerSpec(b)
                  for b in range(num_layers)]
    return Plan(method=config.method, num_source_layers=num_layers, layers=layers, pruned=pruned,
                block_influence=scores, output_norm=config.output_norm and config.method == "flexigpt",
                output_norm_init=config.output_norm_init, config=asdict(config))
