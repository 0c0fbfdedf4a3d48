"""Pruning one block at a time, for models that do not fit in memory (a LLaMA-2-7B on a 24 GB laptop).

The same stages as `prune.py`, with the same results, but the source model is never loaded whole:

    score         calibration activations go through the stack block by block; each block's weights
                  are read from the safetensors shards, run in fp32, and dropped
    select+init   low-rank factors of each block's projections (one block in memory), then the
                  distances, then each slot's SVD adapters (its pruned block and its base in memory)
    save          model.safetensors streamed tensor by tensor from the source shards and the adapters;
                  the source dtype is kept (bf16 stays bf16)

Peak memory is about two blocks in fp32 plus the embedding matrix (~3.5 GB for LLaMA-2-7B). An
interrupted run (a 7B takes ~15 minutes here) resumes from the pieces it finished: see `WorkCache`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from .cache import atomic_dir, atomic_file
from .checkpoint import FORMAT, FORMAT_VERSION, METADATA, WEIGHTS, software_versions
from .errors import FlexiEdgeError
from .influence import block_influence_from_states
from .lowrank import adapter_init
from .memory import StageLog
from .plan import (PROJECTIONS, Plan, PruneConfig, block_factors, choose_bases, low_rank_distances, make_plan,
                   select_pruned_blocks)
from .tensorfile import SafetensorsWriter, TensorFiles, write_tensors

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class BlockSource:
    """The source model's config and weights, one decoder block (in fp32) at a time."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        self.config._attn_implementation = "sdpa"
        self.files = TensorFiles.open(self.folder)
        with torch.device("meta"):
            self._skeleton = AutoModelForCausalLM.from_config(self.config)
        self.num_layers = self.config.num_hidden_layers
        self.dtype = self.files.info("model.embed_tokens.weight").dtype

    def block(self, i: int) -> torch.nn.Module:
        layer = copy.deepcopy(self._skeleton.model.layers[i]).to_empty(device="cpu")
        prefix = f"model.layers.{i}."
        state = {name: self.files.get(prefix + name, torch.float32) for name, _ in layer.state_dict().items()}
        layer.load_state_dict(state, assign=True)
        return layer.eval()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.files.get("model.embed_tokens.weight", torch.float32))

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        rotary = type(self._skeleton.model.rotary_emb)(config=self.config)
        return rotary(hidden, position_ids=positions)

    def projection_weights(self, i: int) -> dict[str, torch.Tensor]:
        return {name: self.files.get(f"model.layers.{i}.{name}.weight", torch.float32) for name in PROJECTIONS}

    def fingerprint(self) -> dict:
        """What identifies the source weights without reading them: each file's path, size and mtime."""
        files = sorted({info.file for info in self.files.tensors.values()})
        return {str(f.resolve()): (f.stat().st_size, f.stat().st_mtime_ns) for f in files}

    def source_parameters(self) -> int:
        return sum(info.numel for info in self.files.tensors.values())

    def close(self) -> None:
        self.files.close()


@torch.no_grad()
def streamed_block_influence(source: BlockSource, windows: torch.Tensor, batch_size: int = 4,
                             progress: bool = True) -> list[float]:
    """Block Influence of every block, running the calibration activations through one block at a time."""
    from transformers.masking_utils import create_causal_mask

    hidden = [source.embed(batch) for batch in windows.split(batch_size)]
    positions = torch.arange(windows.shape[1]).unsqueeze(0)
    rope = source.rotary(hidden[0], positions)
    mask = create_causal_mask(config=source.config, inputs_embeds=hidden[0], attention_mask=None, cache=None,
                              position_ids=positions)
    scores = []
    for i in tqdm(range(source.num_layers), desc="block influence", unit="block", disable=not progress):
        block, total, count = source.block(i), 0.0, 0
        for k, x in enumerate(hidden):
            y = block(x, attention_mask=mask, position_embeddings=rope, position_ids=positions)
            t, c = block_influence_from_states(x, y)
            total, count, hidden[k] = total + t, count + c, y
        scores.append(total / count)
        del block
    return scores


class WorkCache:
    """The finished pieces of a streamed prune (scores, each block's factors, each slot's adapters) in
    OUT.work/, so that an interrupted run resumes where it stopped. A run with other settings or another
    source starts afresh; the folder is removed once the checkpoint is written."""

    def __init__(self, out: Path, key: dict):
        self.folder = Path(out).with_name(Path(out).name + ".work")
        stamp = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        if self.folder.exists() and self._read_stamp() != stamp:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "key.txt").write_text(stamp)
        self.reused = 0

    def _read_stamp(self) -> str | None:
        path = self.folder / "key.txt"
        return path.read_text() if path.is_file() else None

    def tensors(self, name: str, compute) -> dict[str, torch.Tensor]:
        """`compute()` (a dict of tensors), or what an earlier run saved under `name`."""
        path = self.folder / f"{name}.safetensors"
        if path.is_file():
            self.reused += 1
            with TensorFiles.open(path) as files:
                return {n: files.get(n) for n in files.names}
        result = compute()
        with atomic_file(path) as tmp:
            write_tensors(tmp, result)
        return result

    def scores(self, compute) -> list[float]:
        return self.tensors("scores", lambda: {"scores": torch.tensor(compute(), dtype=torch.float64)})["scores"].tolist()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def streamed_bases(source: BlockSource, pruned: list[int], kept: list[int], rank: int, svd: str,
                   cache: WorkCache, progress: bool = True) -> dict[int, int]:
    """The paper's low-rank base choice, with each block's rank-r factors computed from one block in memory."""
    factors = {}
    for b in tqdm(pruned + kept, desc="low-rank factors", unit="block", disable=not progress):
        flat = cache.tensors(f"factors-{b}", lambda: {f"{n}.{side}": f for n, lr in
                                                      block_factors(source.projection_weights(b), rank, svd).items()
                                                      for side, f in zip("LR", lr)})
        factors[b] = {n: (flat[f"{n}.L"], flat[f"{n}.R"]) for n in PROJECTIONS}
    return choose_bases(low_rank_distances(factors, pruned, kept, rank))


def slot_adapters(source: BlockSource, plan: Plan, position: int, svd: str) -> dict[str, torch.Tensor]:
    """One slot's SVD-initialised LoRA factors, by their checkpoint names (fp32)."""
    spec = plan.layers[position]
    pruned_w = source.projection_weights(spec.source_block)
    base_w = source.projection_weights(plan.layers[spec.shares].source_block)
    out = {}
    for name in PROJECTIONS:
        lora_A, lora_B = adapter_init(pruned_w[name], base_w[name], spec.rank, svd)
        out[f"model.layers.{position}.{name}.lora_A"] = lora_A
        out[f"model.layers.{position}.{name}.lora_B"] = lora_B
    return out


def streamed_adapters(source: BlockSource, plan: Plan, svd: str, cache: WorkCache,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for position in tqdm(plan.slots, desc="slot adapters", unit="slot", disable=not progress):
        out.update(cache.tensors(f"adapters-{position}", lambda: slot_adapters(source, plan, position, svd)))
    return out


def layer_tensor_sources(plan: Plan, source_names: list[str]) -> list[tuple[str, str | None]]:
    """(checkpoint name, source name or None for a new tensor) in the order the checkpoint stores them.

    Kept layers copy their block's tensors; a slot stores its pruned block's two RMSNorms, its output
    norms and its adapters, never the shared projection weights (those live under the base's name).
    """
    out = [("model.embed_tokens.weight", "model.embed_tokens.weight")]
    for position, spec in enumerate(plan.layers):
        prefix, src = f"model.layers.{position}.", f"model.layers.{spec.source_block}."
        norms = [n for n in source_names if n.startswith(src) and "layernorm" in n]
        out += [(prefix + n[len(src):], n) for n in norms]
        if not spec.is_slot:
            out += [(prefix + n[len(src):], n) for n in source_names
                    if n.startswith(src) and n not in norms]
            continue
        if plan.output_norm:
            out += [(prefix + "attn_output_norm.weight", None), (prefix + "mlp_output_norm.weight", None)]
        if spec.rank:
            out += [(f"{prefix}{proj}.{kind}", None) for proj in PROJECTIONS for kind in ("lora_A", "lora_B")]
    out.append(("model.norm.weight", "model.norm.weight"))
    if "lm_head.weight" in source_names:
        out.append(("lm_head.weight", "lm_head.weight"))
    return out


def write_streamed_checkpoint(source: BlockSource, plan: Plan, adapters: dict[str, torch.Tensor], out: Path,
                              provenance: dict, tokenizer_from: Path, overwrite: bool = False) -> Path:
    """The checkpoint folder of `checkpoint.py`, written tensor by tensor from the source shards."""
    hidden, dtype = source.config.hidden_size, source.dtype
    names = source.files.names
    if source.config.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    layout = layer_tensor_sources(plan, names)

    def shape_of(name, src):
        if src is not None:
            return source.files.shape(src)
        return (hidden,) if name.endswith("output_norm.weight") else tuple(adapters[name].shape)

    def tensor_of(name, src):
        if src is not None:
            return source.files.get(src)
        if name.endswith("output_norm.weight"):
            return torch.full((hidden,), plan.output_norm_init, dtype=dtype)
        return adapters[name].to(dtype)

    entries = [(name, dtype if src is None else source.files.info(src).dtype, shape_of(name, src)) for name, src in layout]
    stored = sum(torch.Size(shape).numel() for _, _, shape in entries)
    stored_bytes = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for _, d, s in entries)
    shared = sum(source.files.info(f"model.layers.{plan.layers[p].source_block}.{proj}.weight").numel
                 for p in plan.slots for proj in PROJECTIONS)
    counts = dict(stored=stored, stored_bytes=stored_bytes, computed=stored + shared,
                  source=provenance["source_parameters"], stored_ratio=stored / provenance["source_parameters"])
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with SafetensorsWriter(tmp / WEIGHTS, entries, {"format": FORMAT}) as w:
            for name, src in tqdm(layout, desc="writing checkpoint", unit="tensor"):
                w.write(name, tensor_of(name, src))
        config = copy.deepcopy(source.config)
        config.num_hidden_layers = len(plan.layers)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == plan.num_source_layers:
            config.layer_types = [layer_types[s.source_block] for s in plan.layers]
        config.save_pretrained(tmp)
        for f in side_files(tokenizer_from):
            shutil.copy2(f, tmp / f.name)
        metadata = dict(format=FORMAT, format_version=FORMAT_VERSION, plan=plan.to_json(), parameters=counts,
                        weights=dict(file=WEIGHTS, sha256=w.sha256, bytes=(tmp / WEIGHTS).stat().st_size),
                        provenance=dict(provenance, **software_versions()))
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
    return out


def side_files(folder: Path) -> list[Path]:
    """The source folder's tokenizer, chat template and generation config: every file but weights and configs."""
    skip = {"config.json", "model.safetensors.index.json", METADATA}
    return [f for f in sorted(Path(folder).iterdir())
            if f.is_file() and f.name not in skip and not f.name.endswith(WEIGHT_SUFFIXES)
            and not f.name.startswith(".")]


def prune_blockwise(folder: Path, out: Path, config: PruneConfig, calibration, model_spec: str,
                    overwrite: bool = False, log: StageLog | None = None) -> Path:
    """`prune.prune` for a model that is never loaded whole (see the module docstring)."""
    from transformers import AutoTokenizer

    from .prune import calibration_record, calibration_windows  # prune imports this module

    if config.method == "flexigpt" and config.selection != "lowrank":
        raise FlexiEdgeError(f"--selection {config.selection} needs the whole model in memory: use "
                             "--selection lowrank with --stream, or prune without --stream")
    if getattr(config, "rank_allocation", "uniform") != "uniform":
        raise FlexiEdgeError(f"--rank-allocation {config.rank_allocation} is not available with --stream: "
                             "use uniform ranks, or prune without --stream")
    if Path(out).exists() and not overwrite:
        raise FlexiEdgeError(f"{out} already exists: choose another --out or pass --force to replace it")
    log = log or StageLog()
    source = BlockSource(folder)
    cache = WorkCache(Path(out), dict(source=source.fingerprint(), config=asdict(config),
                                      calibration=asdict(calibration)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        with log.stage("score"):
            windows = calibration_windows(tokenizer, calibration)
            scores = cache.scores(lambda: streamed_block_influence(source, windows, calibration.batch_size))
        with log.stage("select_init"):
            pruned = select_pruned_blocks(scores, config.num_to_prune(len(scores)), config.protect_ends)
            bases, adapters = None, {}
            if config.method == "flexigpt":
                kept = [b for b in range(len(scores)) if b not in pruned]
                rank = config.selection_rank or max(config.rank, 1)
                bases = streamed_bases(source, pruned, kept, rank, config.svd, cache)
            plan = make_plan(config, scores, pruned, bases)
            if config.method == "flexigpt" and config.rank and config.svd_init:
                adapters = streamed_adapters(source, plan, config.svd, cache)
            elif config.method == "flexigpt" and config.rank:
                raise FlexiEdgeError("--no-svd-init is not available with --stream")
        provenance = dict(source_model=str(model_spec), source_folder=str(folder),
                          source_parameters=source.source_parameters(),
                          calibration=calibration_record(calibration, windows), streamed=True,
                          stages=log.records)
        if cache.reused:
            print(f"flexiedge: resumed an interrupted prune ({cache.reused} finished pieces reused from "
                  f"{cache.folder})", file=sys.stderr)
        with log.stage("save"):
            write_streamed_checkpoint(source, plan, adapters, Path(out), provenance, Path(folder), overwrite)
        cache.remove()
    finally:
        source.close()
    _record_stages(Path(out), log.records)
    return Path(out)


def _record_stages(run: Path, records: list[dict]) -> None:
    """Add the save stage's own record to flexiedge.json (it ends after the file is written)."""
    path = run / METADATA
    metadata = json.loads(path.read_text())
    metadata["provenance"]["stages"] = records
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2))


def fp32_bytes(folder: Path) -> int:
    with TensorFiles.open(folder) as files:
        return 4 * sum(info.numel for info in files.tensors.values())
