"""GGUF export for llama.cpp: every shared block stored once, slot adapters in a LoRA adapter file.

    flexiedge export gguf runs/smollm2-30 --out exports/smollm2-30-gguf --type f16 [--layout compact|stock]

    OUT/
      model.gguf             `llama` arch. compact: a slot's seven projections are ALIASES of its base
                             layer's tensors (one copy of the bytes; needs the patched runtime in
                             runtimes/llamacpp/); per-slot RMSNorms and output-norm gammas
                             (blk.N.post_attention_norm / post_ffw_norm) are ordinary per-layer tensors.
                             stock: shared weights written once per use, no output norms (any llama.cpp).
      adapters.gguf          llama.cpp LoRA adapter: slot adapters and any kept-block adapters, scale 1
                             (absent when the run has no adapters)
      flexiedge-export.json  provenance, tensor types, sizes and the verify results

The exporter reads the plan (flexiedge.json), config.json and model.safetensors; it never re-derives
sharing from the weights. Conventions follow llama.cpp's convert_hf_to_gguf.py for `llama`: tensor
names, q/k rows permuted to interleaved RoPE pairs, no output.weight when embeddings are tied,
norms kept in F32.

Types. f32/f16: every matrix in that type. Quantized types (q8_0, q4_k, q5_k, q6_k): llama.cpp's own
quantizer, called per tensor (exporters/ggml_quant.py: ggml_quantize_chunk, what llama_model_quantize
runs for each tensor in "pure" mode, so the bytes are the same as llama-quantize's), each owner once,
then aliased. Without llama.cpp's library, q8_0 falls back to gguf-py's quantizer (the same bytes).
A matrix whose rows are not a multiple of the type's block falls back as llama.cpp's quantizer does:
Q4_K (256) -> Q5_0 (32) -> F16; Q5_K -> Q5_1 -> F16; Q6_K -> Q8_0 -> F16; Q8_0 (32) -> F16.
For SmolLM2 (hidden 576 = 2.25 x 256) this leaves only ffn_down (rows of 1536) in Q4_K; everything
else is Q5_0. Adapters use the export type for f32/f16/q8_0 and Q8_0 for the k-quants (factors are small
and precision-sensitive), with the same fallback (lora_b rows are the rank).

Memory. Tensors are read one at a time from model.safetensors (plain reads, no mmap; bf16 or fp32),
encoded and written when the writer reaches them (AliasingGGUFWriter.add_lazy_tensor), so the peak is
about one float32 tensor (the embedding) plus the tokenizer, whatever the model's size.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from flexiedge.cache import atomic_dir
from flexiedge.errors import FlexiEdgeError
from flexiedge.memory import StageLog
from flexiedge.plan import PROJECTIONS, Plan

from . import ggml_quant
from .gguf_writer import AliasingGGUFWriter, lora_adapter_writer, permute_qk

TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
              "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_S, "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}
ADAPTER_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_k": Q.Q8_0, "q5_k": Q.Q8_0, "q6_k": Q.Q8_0}
# llama.cpp's tensor_type_fallback: a 256-block type demotes to a 32-block one, and that to F16
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q5_0: Q.F16, Q.Q5_1: Q.F16, Q.Q8_0: Q.F16}
LAYOUTS = ("compact", "stock")
MODEL_FILE, ADAPTER_FILE, REPORT = "model.gguf", "adapters.gguf", "flexiedge-export.json"
ARCH = "llama"

# HF name inside a layer -> llama.cpp tensor name inside blk.N (convert_hf_to_gguf's llama table)
PROJ_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "attn_output_norm": "post_attention_norm", "mlp_output_norm": "post_ffw_norm"}  # last two: patch
PARITY_MAX_GIB = 6  # f32 logits parity loads the run in PyTorch fp32: fine to ~1.5B parameters, not at 7B
VERIFY_TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
               "nothing to do: once or twice she had peeped into the book her sister was reading")


@dataclass
class GGUFExportConfig:
    """How to export. Fields map one-to-one onto `flexiedge export gguf` options."""
    type: str = "f16"         # f32 | f16 | q8_0 | q4_k (matrices; norms stay F32)
    layout: str = "compact"   # compact: aliases (patched runtime) | stock: any llama.cpp, no output norms
    verify: bool = True       # read back with gguf-py; for f32 also logits vs PyTorch in llama.cpp

    def check(self) -> None:
        if self.type not in TYPES:
            raise FlexiEdgeError(f"unknown --type {self.type!r}: use one of {', '.join(TYPES)}")
        if self.layout not in LAYOUTS:
            raise FlexiEdgeError(f"unknown --layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.type not in ("f32", "f16", "q8_0") and not ggml_quant.available():  # gguf-py has no k-quants
            raise FlexiEdgeError(f"--type {self.type} needs llama.cpp's quantizer (libggml-base from "
                                 "llama-cpp-python): run python -m flexiedge.runtimes.llamacpp.build")


# --- what goes where: the tensor map, from the plan alone ------------------------------------------------

@dataclass
class TensorEntry:
    """One tensor of model.gguf: its HF source name, or the GGUF tensor whose bytes it shares."""
    name: str                       # llama.cpp name, e.g. blk.3.attn_q.weight
    source: str                     # HF name in model.safetensors (for an alias: the owner's source)
    heads: int | None = None        # q/k: rows permuted for RoPE with this many heads
    shares: str | None = None       # the owner's GGUF name when this tensor reuses its bytes


@dataclass
class AdapterEntry:
    """One LoRA pair of adapters.gguf, applied to the model tensor `target`."""
    target: str                     # e.g. blk.3.attn_q.weight
    source: str                     # HF prefix, e.g. model.layers.3.self_attn.q_proj (+ .lora_A / .lora_B)
    heads: int | None = None        # q/k: rows of B permuted like the weight's


@dataclass
class Hparams:
    vocab_size: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Hparams":
        if cfg.get("model_type") != "llama":
            raise FlexiEdgeError(f"GGUF export supports llama-architecture runs; config.json has model_type "
                                 f"{cfg.get('model_type')!r}")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise FlexiEdgeError(f"GGUF export expects {key}=false (llama.cpp's llama has no biases)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise FlexiEdgeError(f"GGUF export expects hidden_act 'silu', got {cfg['hidden_act']!r}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise FlexiEdgeError(f"GGUF export supports default RoPE only, got rope_type {rope['rope_type']!r}")
        n_head = cfg["num_attention_heads"]
        return cls(vocab_size=cfg["vocab_size"], hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"],
                   n_head=n_head, n_head_kv=cfg.get("num_key_value_heads") or n_head,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
                   context=cfg.get("max_position_embeddings", 2048), rms_eps=cfg.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                   tied=bool(cfg.get("tie_word_embeddings", False)))


def tensor_map(plan: Plan, hp: Hparams, layout: str = "compact") -> list[TensorEntry]:
    """model.gguf's tensors in writing order: owners in layer order, then the aliases (which need their owner)."""
    owners = [TensorEntry("token_embd.weight", "model.embed_tokens.weight")]
    aliases = []
    for p, spec in enumerate(plan.layers):
        norms = [n for n in ("input_layernorm", "post_attention_layernorm")]
        if spec.is_slot and plan.output_norm:
            norms += ["attn_output_norm", "mlp_output_norm"]
        owners += [TensorEntry(f"blk.{p}.{NORM_NAMES[n]}.weight", f"model.layers.{p}.{n}.weight") for n in norms]
        for proj, short in PROJ_NAMES.items():
            heads = {"attn_q": hp.n_head, "attn_k": hp.n_head_kv}.get(short)
            name = f"blk.{p}.{short}.weight"
            if spec.is_slot:  # the base layer's tensor, stored under the base's name
                base = TensorEntry(f"blk.{spec.shares}.{short}.weight", f"model.layers.{spec.shares}.{proj}.weight", heads)
                shares = base.name if layout == "compact" else None
                (aliases if shares else owners).append(TensorEntry(name, base.source, heads, shares))
            else:
                owners.append(TensorEntry(name, f"model.layers.{p}.{proj}.weight", heads))
    owners.append(TensorEntry("output_norm.weight", "model.norm.weight"))
    if not hp.tied:
        owners.append(TensorEntry("output.weight", "lm_head.weight"))
    return owners + aliases


def adapter_map(plan: Plan, hp: Hparams, has_tensor) -> list[AdapterEntry]:
    """Every LoRA pair: slots (rank > 0) and kept blocks with their own adapters (names present in the file)."""
    out = []
    for p, spec in enumerate(plan.layers):
        if not spec.rank:
            continue
        for proj, short in PROJ_NAMES.items():
            source = f"model.layers.{p}.{proj}"
            if not has_tensor(f"{source}.lora_A"):
                raise FlexiEdgeError(f"layer {p} has rank {spec.rank} in the plan but {source}.lora_A is not in "
                                     "model.safetensors: the checkpoint does not match its plan")
            out.append(AdapterEntry(f"blk.{p}.{short}.weight", source,
                                    {"attn_q": hp.n_head, "attn_k": hp.n_head_kv}.get(short)))
    return out


# --- reading the run --------------------------------------------------------------------------------------

@dataclass
class RunFiles:
    """A run folder (or plain HF folder) as the exporter sees it: plan, config, tokenizer and lazy weights."""
    path: Path
    plan: Plan
    config: dict
    weights: Path
    metadata: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> "RunFiles":
        from flexiedge.checkpoint import METADATA, checked_weights, is_plain_model, read_metadata
        from flexiedge.models import BUILTIN_MODELS, resolve_model_dir

        path = Path(path)
        if str(path) in BUILTIN_MODELS:
            path = resolve_model_dir(str(path))
        if not (path / "config.json").is_file():
            raise FlexiEdgeError(f"{path} has no config.json: give a run folder written by `flexiedge prune` "
                                 "or an HF model folder")
        config = json.loads((path / "config.json").read_text())
        if is_plain_model(path) and not (path / METADATA).exists():
            plan, metadata, weights = Plan.identity(config["num_hidden_layers"]), {}, path / "model.safetensors"
            if not weights.is_file() and (path / "model.safetensors.index.json").is_file():
                weights = path  # an HF shard set (e.g. LLaMA-2-7B's two shards): read through its index
        else:
            metadata = read_metadata(path)
            plan, weights = Plan.from_json(metadata["plan"]), checked_weights(path, metadata)  # before any work
        if not weights.exists():
            raise FlexiEdgeError(f"{weights} is missing: expected the weights as model.safetensors "
                                 "(or an HF model.safetensors.index.json with its shards)")
        return cls(path, plan, config, weights, metadata)


class WeightReader:
    """float32 numpy tensors out of model.safetensors by HF name, one at a time (plain reads, no mmap, so
    memory does not grow with the file; bf16/fp16/fp32 checkpoints are converted per tensor)."""

    def __init__(self, path: Path):
        from flexiedge.tensorfile import TensorFiles
        self._files = TensorFiles.open(path)
        self.names = set(self._files.names)
        self.path = path

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _check(self, name: str) -> None:
        if name not in self.names:
            raise FlexiEdgeError(f"{self.path} lacks tensor {name}, which the plan needs: the checkpoint is "
                                 "incomplete; re-run `flexiedge prune`")

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file header (nothing read)."""
        self._check(name)
        return tuple(self._files.shape(name))

    def get(self, name: str) -> np.ndarray:
        import torch
        self._check(name)
        return self._files.get(name, torch.float32).numpy()

    def close(self) -> None:
        self._files.close()


def hf_array(reader: WeightReader, entry: TensorEntry) -> np.ndarray:
    """The float32 array for a GGUF tensor in llama.cpp's row order."""
    t = reader.get(entry.source)
    return permute_qk(t, entry.heads) if entry.heads else t


# --- encoding: one GGUF type per tensor ---------------------------------------------------------------------

def storage_type(qtype: Q, shape: tuple[int, ...]) -> Q:
    """The type a tensor is stored in: norms (1-D) F32; rows that don't fill whole blocks fall back."""
    if len(shape) < 2:
        return Q.F32
    while qtype in FALLBACK and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = FALLBACK[qtype]
    return qtype


def encode(array: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """(data, type) for GGUFWriter.add_tensor(raw_dtype=type), after the fallback for odd row lengths."""
    qtype = storage_type(qtype, array.shape)
    return encode_as(array, qtype), qtype


def encode_as(array: np.ndarray, qtype: Q) -> np.ndarray:
    """`array` (float32) in exactly `qtype`: quantized types by llama.cpp's quantizer (gguf-py's without it)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(array, np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    if ggml_quant.available():
        return ggml_quant.quantize(array, qtype)
    try:
        return gguf.quants.quantize(np.ascontiguousarray(array, np.float32), qtype)
    except NotImplementedError:
        raise FlexiEdgeError(f"{qtype.name} needs llama.cpp's quantizer (gguf-py has none): "
                             "run python -m flexiedge.runtimes.llamacpp.build") from None


def type_bytes(qtype: Q, numel: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return numel // block * size


# --- writing ----------------------------------------------------------------------------------------------

def add_hparams(w: gguf.GGUFWriter, hp: Hparams, plan: Plan, name: str, file_type, layout: str) -> None:
    w.add_name(name)
    w.add_context_length(hp.context)
    w.add_embedding_length(hp.hidden)
    w.add_block_count(len(plan.layers))
    w.add_feed_forward_length(hp.ffn)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    if plan.output_norm and plan.slots:
        w.add_layer_norm_eps(plan.output_norm_eps)  # the patch's output norms (LayerNorm, no bias)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.hidden // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_vocab_size(hp.vocab_size)
    w.add_file_type(file_type)
    slot_map = {p: plan.layers[p].shares for p in plan.slots}
    w.add_string("flexiedge.plan", json.dumps(dict(method=plan.method, layout=layout, slots=slot_map,
                                                   ranks=[s.rank for s in plan.layers], output_norm=plan.output_norm)))


def add_tokenizer(w: gguf.GGUFWriter, run: Path, hp: Hparams, config: dict) -> None:
    """GPT-2 style byte-level BPE from tokenizer.json (SmolLM2's kind), as convert_hf_to_gguf lays it out."""
    from .gguf_tokenizer import bpe_vocab
    v = bpe_vocab(run, hp.vocab_size, config)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    for key, value in v.special.items():
        getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(v.add_bos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def write_model(path: Path, entries: list[TensorEntry], reader: WeightReader, qtype: Q, hp: Hparams, plan: Plan,
                run: RunFiles, file_type, layout: str) -> None:
    """model.gguf, streamed: each owner is read, encoded and written when the writer reaches it (stock
    layout: a shared weight is encoded again for each slot that uses it, rather than kept in memory)."""
    w = AliasingGGUFWriter(path, ARCH)
    add_hparams(w, hp, plan, run.path.name, file_type, layout)
    add_tokenizer(w, run.path, hp, run.config)
    for e in entries:
        if e.shares is not None:
            w.add_alias(e.name, e.shares)
        else:
            shape = reader.shape(e.source)
            stored = storage_type(qtype, shape)
            w.add_lazy_tensor(e.name, shape, stored, _encoder(reader, e, stored))
    w.write()


def _encoder(reader: WeightReader, entry: TensorEntry, qtype: Q):
    """The writer calls this when it reaches the tensor: read it, permute q/k, encode; nothing kept."""
    return lambda: encode_as(hf_array(reader, entry), qtype)


def write_adapters(path: Path, adapters: list[AdapterEntry], reader: WeightReader, qtype: Q) -> None:
    """adapters.gguf, streamed like model.gguf: each factor read and encoded when the writer reaches it."""
    ranks = set()
    for a in adapters:
        (rank, _), (_, rank_b) = reader.shape(f"{a.source}.lora_A"), reader.shape(f"{a.source}.lora_B")
        if rank != rank_b:
            raise FlexiEdgeError(f"{a.source}: lora_A has rank {rank} and lora_B rank {rank_b}: the checkpoint "
                                 "is corrupt; re-run `flexiedge prune`")
        ranks.add(rank)
    # llama.cpp scales each pair by alpha / rank, or by 1 when alpha is 0. One rank: alpha = rank (scale 1,
    # as PEFT writes it). Several ranks (slots and kept blocks differ): alpha 0, so every pair gets scale 1.
    alpha = float(ranks.pop()) if len(ranks) == 1 else 0.0
    w = lora_adapter_writer(path, ARCH, alpha)
    for a in adapters:
        for suffix, factor, heads in (("lora_a", "lora_A", None), ("lora_b", "lora_B", a.heads)):
            entry = TensorEntry(f"{a.target}.{suffix}", f"{a.source}.{factor}", heads)  # B's rows permute like W's
            stored = storage_type(qtype, reader.shape(entry.source))
            w.add_lazy_tensor(entry.name, reader.shape(entry.source), stored, _encoder(reader, entry, stored))
    w.write()


# --- the export -------------------------------------------------------------------------------------------

def export_gguf(run_dir: Path, out: Path, config: GGUFExportConfig, overwrite: bool = False) -> dict:
    """Write OUT/model.gguf (+ adapters.gguf), verify, and return the report (also OUT/flexiedge-export.json)."""
    config.check()
    run = RunFiles.open(run_dir)
    plan, hp = run.plan, Hparams.from_config(run.config)
    if len(plan.layers) != run.config["num_hidden_layers"]:
        raise FlexiEdgeError(f"the plan has {len(plan.layers)} layers, config.json {run.config['num_hidden_layers']}")
    if config.layout == "stock" and plan.output_norm and plan.slots:
        raise FlexiEdgeError("--layout stock cannot hold output norms (stock llama.cpp has no such tensors): "
                             "export --layout compact for the patched runtime, or prune with "
                             "`flexiedge prune --no-output-norm`")
    reader = WeightReader(run.weights)
    entries = tensor_map(plan, hp, config.layout)
    adapters = adapter_map(plan, hp, reader.__contains__)
    qtype = TYPES[config.type]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        try:
            write_model(tmp / MODEL_FILE, entries, reader, qtype, hp, plan, run, FILE_TYPES[config.type],
                        config.layout)
            if adapters:
                write_adapters(tmp / ADAPTER_FILE, adapters, reader, ADAPTER_TYPES[config.type])
        finally:
            reader.close()
        report = dict(run=str(run.path), config=asdict(config), plan=dict(method=plan.method, slots=plan.slots),
                      types=_type_counts(tmp), storage=storage_report(tmp),
                      provenance=_provenance(run))
        if config.verify:
            report["verify"] = verify_export(tmp, run, entries, adapters, config)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _type_counts(folder: Path) -> dict:
    counts: dict[str, int] = {}
    for f in (MODEL_FILE, ADAPTER_FILE):
        if (folder / f).is_file():
            for t in gguf.GGUFReader(folder / f).tensors:
                key = f"{f}:{t.tensor_type.name}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def storage_report(folder: Path) -> dict:
    """File bytes against the unique parameters at the bytes per element of the type each is stored in.

    unique_payload_bytes = sum over tensors that own data (each base weight once, each norm, embedding,
    adapter factor) of numel x bytes-per-element of its stored type (F32 norms 4, F16 2, Q8_0 34/32,
    Q5_0 22/32, Q4_K 144/256).
    bytes_over_unique = data-section bytes (file size minus header, key/values incl. the tokenizer, and
    tensor infos) / payload: 1.0 up to alignment padding when every shared weight is stored once (a
    duplicated slot would add ~0.3). file_bytes_over_unique also counts the metadata (~1.8 MB for
    SmolLM2's 49k-token vocabulary).
    """
    model = gguf.GGUFReader(folder / MODEL_FILE)
    offsets = {}
    for t in model.tensors:  # owners: distinct data offsets
        offsets.setdefault(int(t.data_offset), (int(t.n_elements), int(t.n_bytes), t.tensor_type.name))
    payload = sum(nb for _, nb, _ in offsets.values())
    params = sum(n for n, _, _ in offsets.values())
    adapter_bytes = adapter_payload = adapter_params = 0
    if (folder / ADAPTER_FILE).is_file():
        ad = gguf.GGUFReader(folder / ADAPTER_FILE)
        adapter_payload = sum(int(t.n_bytes) for t in ad.tensors)
        adapter_params = sum(int(t.n_elements) for t in ad.tensors)
        adapter_bytes = (folder / ADAPTER_FILE).stat().st_size
    model_bytes = (folder / MODEL_FILE).stat().st_size
    total = model_bytes + adapter_bytes
    data = model_bytes - model.data_offset + (adapter_bytes - ad.data_offset if adapter_bytes else 0)
    return dict(model_bytes=model_bytes, adapter_bytes=adapter_bytes, total_bytes=total, data_bytes=data,
                metadata_bytes=total - data, unique_params=params + adapter_params,
                unique_payload_bytes=payload + adapter_payload, bytes_over_unique=data / (payload + adapter_payload),
                file_bytes_over_unique=total / (payload + adapter_payload))


def _provenance(run: RunFiles) -> dict:
    import flexiedge
    prov = dict(flexiedge=flexiedge.__version__, gguf=_version("gguf"), python=sys.version.split()[0])
    if run.metadata:
        prov.update(weights_sha256=run.metadata["weights"]["sha256"], checkpoint_parameters=run.metadata["parameters"])
    return prov


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# --- verify -----------------------------------------------------------------------------------------------

def verify_export(folder: Path, run: RunFiles, entries: list[TensorEntry], adapters: list[AdapterEntry],
                  config: GGUFExportConfig) -> dict:
    """Round trip through gguf-py (names, shapes, aliases); for f32 also logits in llama.cpp vs PyTorch."""
    result = dict(round_trip=check_round_trip(folder, entries, adapters, run))
    if config.type == "f32":
        from flexiedge.runtimes.llamacpp.build import runtime_status
        from flexiedge.tensorfile import TensorFiles
        status = runtime_status()
        gib = 4 * sum(t.numel for t in TensorFiles.open(run.weights).tensors.values()) / 2**30
        if not status.ok:
            result["parity_skipped"] = status.reason
        elif gib > PARITY_MAX_GIB:  # the PyTorch reference would hold the whole model in fp32, plus llama.cpp's copy
            result["parity_skipped"] = (f"the model is {gib:.1f} GiB in fp32, over {PARITY_MAX_GIB} GiB for a "
                                        "PyTorch reference")
        else:
            result.update(logits_parity(folder, run.path))
    return result


def check_round_trip(folder: Path, entries: list[TensorEntry], adapters: list[AdapterEntry], run: RunFiles) -> str:
    reader = WeightReader(run.weights)
    got = {t.name: t for t in gguf.GGUFReader(folder / MODEL_FILE).tensors}
    want = {e.name: e for e in entries}
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise FlexiEdgeError(f"{MODEL_FILE} round trip: expected the plan's tensors; missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
    shapes = {}
    for e in entries:
        shape = tuple(reversed(reader.shape(e.source)))  # GGUF lists ne0 first
        if tuple(int(x) for x in got[e.name].shape) != shape:
            raise FlexiEdgeError(f"{MODEL_FILE} round trip: {e.name} has shape {tuple(got[e.name].shape)}, "
                                 f"expected {shape} from {e.source}")
        shapes[e.name] = shape
    owner_offsets = [int(got[e.name].data_offset) for e in entries if e.shares is None]
    if len(set(owner_offsets)) != len(owner_offsets):
        raise FlexiEdgeError(f"{MODEL_FILE} round trip: two tensors that should own bytes share an offset")
    for e in entries:
        if e.shares is not None and got[e.name].data_offset != got[e.shares].data_offset:
            raise FlexiEdgeError(f"{MODEL_FILE} round trip: {e.name} should alias {e.shares} but has its own bytes")
    if adapters:
        ad = {t.name: t for t in gguf.GGUFReader(folder / ADAPTER_FILE).tensors}
        for a in adapters:
            r_in, r_out = reader.shape(f"{a.source}.lora_A"), reader.shape(f"{a.source}.lora_B")
            for suffix, shape in (("lora_a", tuple(reversed(r_in))), ("lora_b", tuple(reversed(r_out)))):
                t = ad.get(f"{a.target}.{suffix}")
                if t is None or tuple(int(x) for x in t.shape) != shape:
                    raise FlexiEdgeError(f"{ADAPTER_FILE} round trip: expected {a.target}.{suffix} of shape {shape}")
        if len(ad) != 2 * len(adapters):
            raise FlexiEdgeError(f"{ADAPTER_FILE} round trip: expected {2 * len(adapters)} tensors, got {len(ad)}")
    n_alias = sum(e.shares is not None for e in entries)
    return f"ok: {len(entries)} tensors ({n_alias} aliases), {2 * len(adapters)} adapter tensors"


def logits_parity(folder: Path, run_dir: Path, ids: list[int] | None = None) -> dict:
    """Max |logit diff| and argmax agreement of llama.cpp (f32 KV, no flash attention) vs the PyTorch model."""
    import torch
    from flexiedge.checkpoint import load_checkpoint
    from flexiedge.runtimes.llamacpp import LlamaCppModel

    ckpt = load_checkpoint(run_dir, verify=False)  # RunFiles.open checked the weights' sha256
    if ids is None:
        ids = ckpt.tokenizer(VERIFY_TEXT)["input_ids"][:64]
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([ids])).logits[0].float().numpy()
    adapters = folder / ADAPTER_FILE
    with LlamaCppModel.load(folder / MODEL_FILE, adapters if adapters.is_file() else None, n_threads=2,
                            n_ctx=max(64, len(ids)), kv_type="f32", flash_attn=False) as m:
        got = m.logits(ids)
        tokens_match = m.tokenize(VERIFY_TEXT, add_bos=False) == ckpt.tokenizer(VERIFY_TEXT)["input_ids"]
    diff = float(np.abs(got - ref).max())
    return dict(logit_max_abs_diff=diff, argmax_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                positions=len(ids), tokenizer_matches_hf=bool(tokens_match))


# --- command line -----------------------------------------------------------------------------------------

def add_export_command(export_subparsers) -> None:
    p = export_subparsers.add_parser("gguf", help="GGUF for llama.cpp (shared weights once) + LoRA adapter file")
    p.add_argument("run", help="run folder, HF folder or built-in model name")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--type", default="f16", choices=list(TYPES), help="matrix type (norms stay F32)")
    p.add_argument("--layout", default="compact", choices=LAYOUTS,
                   help="compact: aliases, patched runtime; stock: any llama.cpp (no output norms)")
    p.add_argument("--no-verify", action="store_true", help="skip the read-back and parity checks")
    p.add_argument("--report-memory", action="store_true", help="print the export's time and peak RSS")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export)


def _export(args) -> None:
    config = GGUFExportConfig(type=args.type, layout=args.layout, verify=not args.no_verify)
    log = StageLog(print_to_stderr=args.report_memory)
    with log.stage("export_gguf"):
        report = export_gguf(Path(args.run), Path(args.out), config, overwrite=args.force)
    s = report["storage"]
    print(f"wrote {args.out}: model.gguf {s['model_bytes'] / 2**20:.1f} MiB + adapters.gguf "
          f"{s['adapter_bytes'] / 2**20:.1f} MiB ({s['bytes_over_unique']:.4f} x the unique parameters' bytes)")
    v = report.get("verify", {})
    if "round_trip" in v:
        print(f"round trip {v['round_trip']}", file=sys.stderr)
    if "logit_max_abs_diff" in v:
        print(f"llama.cpp vs PyTorch: max |logit diff| {v['logit_max_abs_diff']:.3g}, argmax agreement "
              f"{v['argmax_agreement']:.2f} over {v['positions']} positions", file=sys.stderr)
