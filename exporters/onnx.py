"""ONNX export: one merged decoder graph with a KV cache, every shared block stored once, run by onnxruntime.

    flexiedge export onnx runs/smollm2-30 --out exports/smollm2-30-onnx --precision fp32

    OUT/
      model.onnx            graph (optimum's names: input_ids, attention_mask, position_ids,
                            past_key_values.{i}.key/value -> logits, present.{i}.key/value)
      model.onnx.data       ONE external data file: each initializer once
      genai_config.json     onnxruntime-genai's config (model type, heads, I/O names, search defaults)
      flexiedge-export.json provenance, sizes and the verify results
      tokenizer files
      draft.onnx            (--draft) the self-speculative draft: the stack without its slots (ShortGPT's
                            architecture, KV inputs past_key_values.{i} over its own layers), whose
                            initializers point INTO model.onnx.data: no weight is stored twice
      draft_genai_config.json  (--draft) genai_config.json for draft.onnx

Slots are ordinary ops: base MatMul + lora_B(lora_A x) + LayerNorm output norms, exactly as
`flexiedge.slots` computes them. Prefill is the same graph with an empty past (length 0).
Every export verifies before it reports success: stored bytes against the checkpoint's unique
parameters, one copy per shared weight (counted from the graph), logits against PyTorch.

Large checkpoints (over 2 GiB in fp32), bf16/fp16 ones, or any with --stream take the streaming path
of `onnx_stream.py`: traced on the meta device, each weight read from the checkpoint when it is written
(a pruned LLaMA-2-7B in under 2 GB of memory); same files, same checks, logits only while the model is
small enough to load.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from flexiedge.cache import atomic_dir
from flexiedge.checkpoint import load_checkpoint
from flexiedge.errors import FlexiEdgeError
from flexiedge.memory import StageLog

from . import onnx_graph as graph

PRECISIONS = ("fp32", "fp16", "int8", "int4")
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}
MODEL_FILE, DATA_FILE, GENAI_CONFIG, REPORT = "model.onnx", "model.onnx.data", "genai_config.json", "flexiedge-export.json"
# the draft of self-speculative decoding (--draft): its graph reads the full model's data file
DRAFT_FILE, DRAFT_DATA_FILE, DRAFT_GENAI_CONFIG = "draft.onnx", "draft.onnx.data", "draft_genai_config.json"
VERIFY_TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
               "nothing to do: once or twice she had peeped into the book her sister was reading")


@dataclass
class OnnxExportConfig:
    """How to export. Fields map one-to-one onto `flexiedge export onnx` options."""
    precision: str = "fp32"       # fp32 | fp16 (fp16 storage, fp32 compute) | int8 | int4 (weight-only blocks)
    opset: int = 18               # the dynamo exporter's; ORT 1.20+ runs it
    block_size: int = 32          # int8/int4: weights per quantisation block
    symmetric: bool = False       # int8/int4: zero point fixed at 0 (asymmetric keeps more 4-bit accuracy)
    accuracy_level: int = 4       # int8/int4 MatMulNBits compute: 4 = int8 activations per block (6x faster
                                  # 8-bit decode on CPU than 1 = fp32, which is exact weight-only but slow)
    quantize_adapters: bool = False  # int8/int4: also quantise lora_A/lora_B (small and precision-sensitive)
    verify: bool = True
    streaming: bool | None = None  # trace on meta, read weights as written (onnx_stream.py); None: when the
                                   # checkpoint is over onnx_stream.STREAM_ABOVE_BYTES in fp32 or not fp32

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise FlexiEdgeError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")


# ------------------------------------------------------------------------------------------------
# the KV-cache wrapper: optimum's merged-decoder signature, written for transformers 5 (`cache=`)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class DecoderWithCache(nn.Module):
    """(input_ids, attention_mask, position_ids, past) -> (logits, present): one graph for prefill and decode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(0, len(past), 2):
            cache.update(past[i], past[i + 1], i // 2)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=True).logits
        return logits, [t for layer in cache.layers for t in (layer.keys, layer.values)]


def kv_shape(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def example_inputs(config, batch: int = 2, seq: int = 3, past: int = 4):
    heads, head_dim = kv_shape(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq)
    cache = [torch.zeros(batch, heads, past, head_dim) for _ in range(2 * config.num_hidden_layers)]
    return ids, mask, positions, cache


def export_program(model: nn.Module, inputs, opset: int):
    """torch.onnx (dynamo) of the KV-cache decoder with dynamic batch and lengths, without its optimizer
    (that folds each use of a shared weight into its own copy). `inputs`: `example_inputs` (CPU or meta)."""
    from torch.export import Dim

    batch, seq, past, total = (Dim(n) for n in ("batch_size", "sequence_length", "past_sequence_length",
                                                 "total_sequence_length"))
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              [{0: batch, 2: past}] * (2 * model.config.num_hidden_layers))
    with torch.no_grad():
        return torch.onnx.export(DecoderWithCache(model).eval(), inputs, dynamic_shapes=shapes, dynamo=True,
                                 opset_version=opset, optimize=False, verbose=False)


def trace(model: nn.Module, opset: int) -> onnx.ModelProto:
    config = model.config
    proto = export_program(model, example_inputs(config), opset).model_proto
    inputs, outputs = io_names(config.num_hidden_layers)
    for value, name in zip(list(proto.graph.input), inputs):
        graph.rename_value(proto, value.name, name)
    for value, name in zip(list(proto.graph.output), outputs):
        graph.rename_value(proto, value.name, name)
    graph.name_nodes(proto, prefix="model.")
    for tensor in proto.graph.initializer:  # "model.model.layers.0..." -> "model.layers.0..."
        if tensor.name.startswith("model."):
            graph.rename_value(proto, tensor.name, tensor.name[len("model."):])
            tensor.name = tensor.name[len("model."):]
    return proto


# ------------------------------------------------------------------------------------------------
# precision


def is_adapter_matmul(node: onnx.NodeProto) -> bool:
    return any("lora_" in x for x in node.input)


def quantize(proto: onnx.ModelProto, config: OnnxExportConfig) -> onnx.ModelProto:
    """fp16: matrices stored as fp16. int8 / int4: MatMul weights become 8- or 4-bit blocks (MatMulNBits,
    weight-only). Shared weights stay shared, because `fold_weight_transposes` left exactly one initializer
    per shared weight. A tied embedding stays fp32 (the lm_head reads it through a Transpose).

    Not `quantize_dynamic`: it also quantises activations per tensor, and SmolLM2's massive activations
    then wreck the logits (argmax agreement ~0.3 with PyTorch, against ~0.97 for weight-only 8-bit)."""
    if config.precision == "fp16":
        graph.store_as_fp16(proto)
        return proto
    if config.precision in ("int8", "int4"):
        import logging
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        skip = [] if config.quantize_adapters else [n.name for n in proto.graph.node if is_adapter_matmul(n)]
        quantizer = MatMulNBitsQuantizer(proto, bits=8 if config.precision == "int8" else 4,
                                         block_size=config.block_size, is_symmetric=config.symmetric,
                                         accuracy_level=config.accuracy_level, nodes_to_exclude=skip)
        quantizer.process()
        return quantizer.model.model
    return proto


# ------------------------------------------------------------------------------------------------
# export


def name_shared_weights(proto: onnx.ModelProto, plan) -> None:
    """The exporter lifts a shared Parameter under one of its users' names; give it its base block's name."""
    from flexiedge.plan import PROJECTIONS
    names = {t.name for t in proto.graph.initializer}
    for position in plan.slots:
        base = plan.layers[position].shares
        for proj in PROJECTIONS:
            for kind in ("weight", "bias"):
                slot_name, base_name = (f"model.layers.{p}.{proj}.{kind}" for p in (position, base))
                if slot_name in names and base_name not in names:
                    graph.rename_value(proto, slot_name, base_name)
                    next(t for t in proto.graph.initializer if t.name == slot_name).name = base_name
                    names = (names - {slot_name}) | {base_name}


def trace_checkpoint(ckpt, opset: int = 18) -> onnx.ModelProto:
    """The fp32 graph with every shared weight as ONE initializer (the slow step: export it once)."""
    proto = trace(ckpt.model, opset)
    name_shared_weights(proto, ckpt.plan)
    graph.fold_weight_transposes(proto)
    graph.deduplicate_initializers(proto)
    return proto


@contextlib.contextmanager
def draft_stack(model: nn.Module):
    """Within the block, `model` is its self-speculative draft: only the layers that are not FlexiSlots,
    renumbered 0..n-1 for the KV cache (config.num_hidden_layers and layer_types follow). The layers are
    the model's own modules, so everything (layer list, layer_idx, config) is restored on exit."""
    from flexiedge.slots import FlexiSlot

    layers, config = model.model.layers, model.config
    kept = [i for i, layer in enumerate(layers) if not isinstance(layer, FlexiSlot)]
    num_layers, layer_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    layer_idx = [layers[i].self_attn.layer_idx for i in kept]
    try:
        for position, i in enumerate(kept):
            layers[i].self_attn.layer_idx = position
        model.model.layers = nn.ModuleList([layers[i] for i in kept])
        config.num_hidden_layers = len(kept)
        if isinstance(layer_types, list) and len(layer_types) == num_layers:
            config.layer_types = [layer_types[i] for i in kept]
        yield kept
    finally:
        model.model.layers = layers
        config.num_hidden_layers = num_layers
        if layer_types is not None:
            config.layer_types = layer_types
        for i, idx in zip(kept, layer_idx):
            layers[i].self_attn.layer_idx = idx


def trace_draft(ckpt, opset: int = 18) -> onnx.ModelProto:
    """The fp32 graph of the draft (the kept layers only), after the same passes as `trace_checkpoint`.
    Its initializers still carry the draft's layer numbers: `write_draft` matches them to the full
    model's by content."""
    if not ckpt.plan.slots:
        raise FlexiEdgeError("this run has no replacement slots, so there is no draft model to export")
    with draft_stack(ckpt.model):
        proto = trace(ckpt.model, opset)
    graph.fold_weight_transposes(proto)
    graph.deduplicate_initializers(proto)
    return proto


def at_precision(traced: onnx.ModelProto, config: OnnxExportConfig) -> onnx.ModelProto:
    proto = quantize(copy.deepcopy(traced), config)
    graph.deduplicate_initializers(proto)  # safety net: a quantizer may emit equal copies
    return proto


def save(proto: onnx.ModelProto, folder: Path) -> None:
    """Write model.onnx + ONE data file. The external-data writer appends to an existing file: the folder
    must be fresh (it is: `atomic_dir` hands out a new one)."""
    if (folder / DATA_FILE).exists():
        raise FileExistsError(f"{folder / DATA_FILE} exists: the external-data writer would append to it")
    onnx.save_model(proto, folder / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=0)


def genai_config(model_config, tokenizer) -> dict:
    """onnxruntime-genai's genai_config.json (https://onnxruntime.ai/docs/genai/reference/config.html)."""
    heads, head_dim = kv_shape(model_config)
    inputs, outputs = io_names(1)
    eos = model_config.eos_token_id if model_config.eos_token_id is not None else tokenizer.eos_token_id
    pad = model_config.pad_token_id if model_config.pad_token_id is not None else tokenizer.pad_token_id
    context = getattr(model_config, "max_position_embeddings", 2048)
    return {
        "model": {
            "bos_token_id": model_config.bos_token_id if model_config.bos_token_id is not None else tokenizer.bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": model_config.hidden_size,
                "inputs": {"input_ids": inputs[0], "attention_mask": inputs[1], "position_ids": inputs[2],
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": outputs[0], "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": model_config.num_attention_heads,
                "num_hidden_layers": model_config.num_hidden_layers,
                "num_key_value_heads": heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": model_config.model_type,
            "vocab_size": model_config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1,
            # Our graph concatenates past and new keys (no fixed-size buffer), so buffers cannot be shared.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def export_onnx(run_dir: Path, out: Path, config: OnnxExportConfig | None = None, overwrite: bool = False,
                draft: bool = False) -> dict:
    """Export a run (or plain model) to OUT; verify; return the report written to flexiedge-export.json.
    `draft`: also write draft.onnx, the self-speculative draft, stored in the same data file."""
    from .onnx_stream import export_onnx_streaming, wants_streaming

    config = config or OnnxExportConfig()
    config.check()
    if Path(out).exists() and not overwrite:  # fail before the slow trace, not after it
        raise FlexiEdgeError(f"{out} already exists: choose another --out or pass --force to replace it")
    if wants_streaming(run_dir, config.streaming):
        if draft:
            raise FlexiEdgeError("--draft is exported in memory only: drop --stream (or --draft) for this run")
        return export_onnx_streaming(run_dir, out, config, overwrite)
    ckpt = load_checkpoint(Path(run_dir))
    if draft and not ckpt.plan.slots:
        raise FlexiEdgeError(f"{run_dir} has no replacement slots, so there is no draft model to export")
    draft_traced = trace_draft(ckpt, config.opset) if draft else None
    return write_export(ckpt, trace_checkpoint(ckpt, config.opset), Path(out), config, overwrite, draft_traced)


def write_export(ckpt, traced: onnx.ModelProto, out: Path, config: OnnxExportConfig, overwrite: bool = False,
                 draft_traced: onnx.ModelProto | None = None) -> dict:
    """Write one precision of a traced checkpoint (several precisions can share one trace); with
    `draft_traced` (from `trace_draft`), also the draft, reading the full model's data file."""
    config.check()
    proto = at_precision(traced, config)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        save(proto, tmp)
        del proto
        ckpt.tokenizer.save_pretrained(tmp)
        (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(ckpt.model.config, ckpt.tokenizer), indent=2))
        report = dict(source=str(ckpt.path), method=ckpt.plan.method, config=asdict(config),
                      plan=ckpt.plan.to_json(), storage=storage(tmp, ckpt, config.precision), versions=versions())
        if config.verify:
            report["verify"] = verify(tmp, ckpt, config.precision, report["storage"])
        if draft_traced is not None:
            report["draft"] = write_draft(ckpt, draft_traced, tmp, config)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report


# ------------------------------------------------------------------------------------------------
# the draft: a second graph over the same data file


def _tensor_digest(data_type: int, dims, raw: bytes) -> tuple:
    return data_type, tuple(dims), hashlib.sha256(raw).hexdigest()


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor)).raw_data


def external_locations(folder: Path, model_file: str = MODEL_FILE) -> dict[str, dict]:
    """Initializer name -> {location, offset, length} of a saved graph's external tensors."""
    proto = onnx.load_model(folder / model_file, load_external_data=False)
    found = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            found[tensor.name] = dict(location=info["location"], offset=int(info.get("offset", 0)),
                                      length=int(info["length"]), data_type=tensor.data_type, dims=list(tensor.dims))
    return found


def stored_digests(folder: Path) -> dict[tuple, str]:
    """(dtype, dims, sha256 of the bytes) -> name, for every initializer stored in folder/model.onnx.data."""
    digests = {}
    with open(folder / DATA_FILE, "rb") as data:
        for name, where in external_locations(folder).items():
            if where["location"] != DATA_FILE:
                continue
            data.seek(where["offset"])
            digests.setdefault(_tensor_digest(where["data_type"], where["dims"], data.read(where["length"])), name)
    return digests


def _rename_initializers(proto: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename initializers all at once (a new name may be another initializer's old one)."""
    for node in proto.graph.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
    for value in proto.graph.output:
        value.name = mapping.get(value.name, value.name)
    for tensor in proto.graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)


def link_draft(draft: onnx.ModelProto, folder: Path) -> dict:
    """Point every draft initializer whose content is stored in folder/model.onnx.data at those bytes,
    under the full model's name (so that a runtime can hand both sessions one buffer per weight).
    Anything not found is left with its data, to be written to draft.onnx.data. Returns counts."""
    digests = stored_digests(folder)
    where = external_locations(folder)
    mapping, linked, linked_bytes, missing = {}, [], 0, []
    for tensor in draft.graph.initializer:
        name = digests.get(_tensor_digest(tensor.data_type, tensor.dims, _raw_bytes(tensor)))
        if name is None:
            missing.append(tensor.name)
            continue
        mapping[tensor.name] = name
        linked.append(tensor)
    _rename_initializers(draft, mapping)
    for tensor in linked:
        loc = where[tensor.name]
        linked_bytes += loc["length"]
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        for key, value in (("location", DATA_FILE), ("offset", loc["offset"]), ("length", loc["length"])):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.data_location = onnx.TensorProto.EXTERNAL
    return dict(linked_initializers=len(linked), linked_bytes=linked_bytes, unmatched_initializers=missing)


def draft_genai_config(full: dict, num_layers: int) -> dict:
    config = copy.deepcopy(full)
    config["model"]["decoder"]["filename"] = DRAFT_FILE
    config["model"]["decoder"]["num_hidden_layers"] = num_layers
    return config


def write_draft(ckpt, draft_traced: onnx.ModelProto, folder: Path, config: OnnxExportConfig) -> dict:
    """draft.onnx beside a saved full export: same precision passes, initializers linked into model.onnx.data
    (anything unmatched, normally nothing, goes to draft.onnx.data); verified against PyTorch with the
    slots skipped. Returns the report's "draft" section."""
    proto = at_precision(draft_traced, config)
    num_layers = sum(1 for x in proto.graph.input if x.name.startswith("past_key_values.")) // 2
    links = link_draft(proto, folder)
    if links["unmatched_initializers"]:  # only those keep raw data: they go to the draft's own file
        onnx.external_data_helper.convert_model_to_external_data(
            proto, all_tensors_to_one_file=True, location=DRAFT_DATA_FILE, size_threshold=0)
    onnx.save_model(proto, folder / DRAFT_FILE)
    del proto
    full_config = json.loads((folder / GENAI_CONFIG).read_text())
    (folder / DRAFT_GENAI_CONFIG).write_text(json.dumps(draft_genai_config(full_config, num_layers), indent=2))
    own = (folder / DRAFT_DATA_FILE).stat().st_size if (folder / DRAFT_DATA_FILE).exists() else 0
    section = dict(layers=num_layers, kept_positions=[i for i in range(len(ckpt.plan.layers))
                                                      if i not in set(ckpt.plan.slots)],
                   model_bytes=(folder / DRAFT_FILE).stat().st_size, own_data_bytes=own, **links)
    if config.verify:
        section["verify"] = verify_draft(folder, ckpt, config.precision)
    return section


def verify_draft(folder: Path, ckpt, precision: str) -> dict:
    from flexiedge.runtimes.pytorch import slots_skipped

    with slots_skipped(ckpt.model):
        return logit_parity(folder, ckpt, precision, draft=True)


# ------------------------------------------------------------------------------------------------
# verify


# (max |logit diff|, least argmax agreement) allowed against PyTorch fp32 on VERIFY_TEXT
TOLERANCE = {"fp32": (1e-3, 1.0), "fp16": (0.5, 0.9), "int8": (None, 0.8), "int4": (None, 0.4)}


def unique_parameters(model: nn.Module) -> int:
    """Parameters stored once each: `parameters()` yields a shared Parameter (and a tied embedding) once."""
    return sum(p.numel() for p in model.parameters())


def expected_shared_groups(plan) -> list[list[int]]:
    """Layer positions that use one base block's weights: [base, slot, slot, ...] per base."""
    groups: dict[int, list[int]] = {}
    for position in plan.slots:
        groups.setdefault(plan.layers[position].shares, []).append(position)
    return [sorted([base, *slots]) for base, slots in groups.items()]


def single_copy(proto: onnx.ModelProto, plan) -> bool:
    """Every shared projection is ONE initializer feeding the MatMuls of its base and all its slots."""
    from flexiedge.plan import PROJECTIONS
    found = list(graph.shared_weights(proto).values())
    return all(found.count(group) == len(PROJECTIONS) for group in expected_shared_groups(plan))


def storage(folder: Path, ckpt, precision: str) -> dict:
    return storage_of(folder, unique_parameters(ckpt.model), ckpt.plan, precision)


def storage_of(folder: Path, unique: int, plan, precision: str) -> dict:
    """Stored bytes against `unique` parameters, and one copy per shared weight, read from the saved graph."""
    proto = onnx.load_model(folder / MODEL_FILE, load_external_data=False)
    stored = (folder / DATA_FILE).stat().st_size
    expected = unique * BYTES_PER_ELEMENT[precision]
    shared = expected_shared_groups(plan)
    return dict(data_bytes=stored, model_bytes=(folder / MODEL_FILE).stat().st_size, unique_parameters=unique,
                expected_bytes=int(expected), bytes_over_unique=stored / expected,
                initializer_bytes=graph.initializer_bytes(proto), shared_groups=shared,
                shared_single_copy=single_copy(proto, plan))


def torch_logits(model: nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions).logits.float().numpy()


def verify_batch(tokenizer, pads: int = 3) -> list[list[int]]:
    """VERIFY_TEXT, and the same text shortened and left-padded by `pads` (padding marked -1)."""
    ids = tokenizer(VERIFY_TEXT, add_special_tokens=False)["input_ids"][:64]
    return [ids, [-1] * pads + ids[:-pads]]


def verify(folder: Path, ckpt, precision: str, s: dict | None = None) -> dict:
    """Check the files before reporting success; raise FlexiEdgeError naming the first failure."""
    check_storage(s or storage(folder, ckpt, precision), precision)
    return logit_parity(folder, ckpt, precision)


def check_storage(s: dict, precision: str) -> None:
    """Raise FlexiEdgeError if a `storage` report shows duplicated weights."""
    # Fewer bytes are fine: the hash-dedup pass also merges tensors that merely have equal values (the
    # zero-initialised lora_B of fresh extension repeats, norms copied from one block). More are not.
    if precision in ("fp32", "fp16") and s["bytes_over_unique"] > 1.01:
        raise FlexiEdgeError(f"export stores {s['data_bytes']:,} bytes, expected {s['expected_bytes']:,} "
                             f"(unique parameters x {BYTES_PER_ELEMENT[precision]}): shared weights were duplicated")
    if not s["shared_single_copy"]:
        raise FlexiEdgeError(f"{precision} export does not keep one copy per shared weight (groups {s['shared_groups']})")


def logit_parity(folder: Path, ckpt, precision: str, draft: bool = False) -> dict:
    """Logits of the exported graph (or draft) against `ckpt.model` on a left-padded batch, within tolerance."""
    from flexiedge.runtimes.onnxruntime import OrtModel

    ids = np.array(verify_batch(ckpt.tokenizer), dtype=np.int64)
    mask = (ids != -1).astype(np.int64)
    ids[ids == -1] = 0
    want = torch_logits(ckpt.model, ids, mask)
    got = OrtModel.load(folder, tokenizer=False, draft=draft).forward(ids, mask)[0]
    real = mask.astype(bool)
    diff = float(np.abs(got - want)[real].max())
    agree = float((got.argmax(-1) == want.argmax(-1))[real].mean())
    max_diff, min_agree = TOLERANCE[precision]
    what = "draft's" if draft else "export's"
    if (max_diff is not None and diff > max_diff) or agree < min_agree:
        raise FlexiEdgeError(f"{precision} {what} logits differ from PyTorch (max |diff| {diff:.3g}, argmax "
                             f"agreement {agree:.2f}); tolerance {max_diff} / {min_agree}")
    return dict(logit_max_abs_diff=diff, argmax_agreement=agree, tolerance=dict(max_abs_diff=max_diff,
                                                                                 argmax_agreement=min_agree))


def versions() -> dict:
    import onnxruntime
    import transformers
    import flexiedge
    return dict(flexiedge=flexiedge.__version__, torch=torch.__version__, transformers=transformers.__version__,
                onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, python=platform.python_version(),
                machine=platform.machine())


# ------------------------------------------------------------------------------------------------
# command line


def add_export_command(export_subparsers) -> None:
    p = export_subparsers.add_parser("onnx", help="ONNX graph with KV cache for onnxruntime (shared weights once)")
    p.add_argument("run", help="run folder, HF folder or built-in model name")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--block-size", type=int, default=32, help="int8/int4: weights per quantisation block")
    p.add_argument("--symmetric", action="store_true", help="int8/int4: symmetric blocks (no zero points)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[1, 4],
                   help="int8/int4 compute: 4 = int8 activations (fast), 1 = fp32 (exact weight-only, slow)")
    p.add_argument("--quantize-adapters", action="store_true", help="int8/int4: quantise LoRA factors too")
    p.add_argument("--draft", action="store_true", help="also write draft.onnx, the self-speculative draft (the "
                   "stack without its slots), reading the full model's weights: nothing stored twice")
    p.add_argument("--stream", action="store_true", default=None, help="trace on the meta device and read each "
                   "weight from the checkpoint as it is written (bounded memory; the default for checkpoints over "
                   "2 GiB in fp32 or stored in bf16/fp16)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--report-memory", action="store_true", help="print the export's time and peak RSS")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export)


def _export(args) -> None:
    config = OnnxExportConfig(precision=args.precision, block_size=args.block_size, symmetric=args.symmetric,
                              accuracy_level=args.accuracy_level,
                              quantize_adapters=args.quantize_adapters, verify=not args.no_verify,
                              streaming=args.stream)
    log = StageLog(print_to_stderr=args.report_memory)
    with log.stage("export_onnx"):
        report = export_onnx(Path(args.run), Path(args.out), config, overwrite=args.force, draft=args.draft)
    s = report["storage"]
    print(f"wrote {args.out}: {s['data_bytes'] / 2**20:.1f} MiB of weights ({s['bytes_over_unique']:.4f} x unique "
          f"parameters at {config.precision}), shared weights stored once: {s['shared_single_copy']}")
    if "verify" in report:
        v = report["verify"]
        print(f"verified against PyTorch: max |logit diff| {v['logit_max_abs_diff']:.3g}, "
              f"argmax agreement {v['argmax_agreement']:.2f}", file=sys.stderr)
    elif "verify_skipped" in report:
        print(report["verify_skipped"], file=sys.stderr)
    if "draft" in report:
        d = report["draft"]
        print(f"draft {DRAFT_FILE}: {d['layers']} layers, {d['linked_initializers']} initializers read from "
              f"{DATA_FILE} ({d['linked_bytes'] / 2**20:.1f} MiB), {d['own_data_bytes']:,} bytes of its own"
              + (f", verified: max |logit diff| {d['verify']['logit_max_abs_diff']:.3g}" if "verify" in d else ""))
