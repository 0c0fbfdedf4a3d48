"""ONNX export: one merged decoder graph with a KV cache, every shared block stored once, run by onnxruntime.

    flexiedge export onnx runs/smollm2-30 --out exports/smollm2-30-onnx --precision fp32

    OUT/
      model.onnx            graph (optimum's names: input_ids, attention_mask, position_ids,
                            past_key_values.{i}.key/value -> logits, present.{i}.key/value)
      model.onnx.data       ONE external data file: each initializer once
      genai_config.json     onnxruntime-genai's config (model type, heads, I/O names, search defaults)
      flexiedge-export.json provenance, sizes and the verify results
      tokenizer files

Slots are ordinary ops: base MatMul + lora_B(lora_A x) + LayerNorm output norms, exactly as
`flexiedge.slots` computes them. Prefill is the same graph with an empty past (length 0).
Every export verifies before it reports success: stored bytes against the checkpoint's unique
parameters, one copy per shared weight (counted from the graph), logits against PyTorch.
"""

from __future__ import annotations

import copy
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

from . import onnx_graph as graph

PRECISIONS = ("fp32", "fp16", "int8", "int4")
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}
MODEL_FILE, DATA_FILE, GENAI_CONFIG, REPORT = "model.onnx", "model.onnx.data", "genai_config.json", "flexiedge-export.json"
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


def trace(model: nn.Module, opset: int) -> onnx.ModelProto:
    """torch.onnx (dynamo) without its optimizer: that folds each use of a shared weight into its own copy."""
    from torch.export import Dim

    config = model.config
    batch, seq, past, total = (Dim(n) for n in ("batch_size", "sequence_length", "past_sequence_length",
                                                 "total_sequence_length"))
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              [{0: batch, 2: past}] * (2 * config.num_hidden_layers))
    with torch.no_grad():
        program = torch.onnx.export(DecoderWithCache(model).eval(), example_inputs(config), dynamic_shapes=shapes,
                                    dynamo=True, opset_version=opset, optimize=False, verbose=False)
    proto = program.model_proto
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


def export_onnx(run_dir: Path, out: Path, config: OnnxExportConfig | None = None, overwrite: bool = False) -> dict:
    """Export a run (or plain model) to OUT; verify; return the report written to flexiedge-export.json."""
    config = config or OnnxExportConfig()
    config.check()
    if Path(out).exists() and not overwrite:  # fail before the slow trace, not after it
        raise FlexiEdgeError(f"{out} already exists: choose another --out or pass --force to replace it")
    ckpt = load_checkpoint(Path(run_dir))
    return write_export(ckpt, trace_checkpoint(ckpt, config.opset), Path(out), config, overwrite)


def write_export(ckpt, traced: onnx.ModelProto, out: Path, config: OnnxExportConfig, overwrite: bool = False) -> dict:
    """Write one precision of a traced checkpoint (several precisions can share one trace)."""
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
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report


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
    proto = onnx.load_model(folder / MODEL_FILE, load_external_data=False)
    stored = (folder / DATA_FILE).stat().st_size
    unique = unique_parameters(ckpt.model)
    expected = unique * BYTES_PER_ELEMENT[precision]
    shared = expected_shared_groups(ckpt.plan)
    return dict(data_bytes=stored, model_bytes=(folder / MODEL_FILE).stat().st_size, unique_parameters=unique,
                expected_bytes=int(expected), bytes_over_unique=stored / expected,
                initializer_bytes=graph.initializer_bytes(proto), shared_groups=shared,
                shared_single_copy=single_copy(proto, ckpt.plan))


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
    from flexiedge.runtimes.onnxruntime import OrtModel

    s = s or storage(folder, ckpt, precision)
    if precision in ("fp32", "fp16") and abs(s["bytes_over_unique"] - 1) > 0.01:
        raise FlexiEdgeError(f"export stores {s['data_bytes']:,} bytes, expected {s['expected_bytes']:,} "
                             f"(unique parameters x {BYTES_PER_ELEMENT[precision]}): shared weights were duplicated")
    if not s["shared_single_copy"]:
        raise FlexiEdgeError(f"{precision} export does not keep one copy per shared weight (groups {s['shared_groups']})")
    ids = np.array(verify_batch(ckpt.tokenizer), dtype=np.int64)
    mask = (ids != -1).astype(np.int64)
    ids[ids == -1] = 0
    want = torch_logits(ckpt.model, ids, mask)
    got = OrtModel.load(folder, tokenizer=False).forward(ids, mask)[0]
    real = mask.astype(bool)
    diff = float(np.abs(got - want)[real].max())
    agree = float((got.argmax(-1) == want.argmax(-1))[real].mean())
    max_diff, min_agree = TOLERANCE[precision]
    if (max_diff is not None and diff > max_diff) or agree < min_agree:
        raise FlexiEdgeError(f"{precision} export's logits differ from PyTorch (max |diff| {diff:.3g}, argmax "
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
    p.add_argument("--no-verify", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export)


def _export(args) -> None:
    config = OnnxExportConfig(precision=args.precision, block_size=args.block_size, symmetric=args.symmetric,
                              accuracy_level=args.accuracy_level,
                              quantize_adapters=args.quantize_adapters, verify=not args.no_verify)
    report = export_onnx(Path(args.run), Path(args.out), config, overwrite=args.force)
    s = report["storage"]
    print(f"wrote {args.out}: {s['data_bytes'] / 2**20:.1f} MiB of weights ({s['bytes_over_unique']:.4f} x unique "
          f"parameters at {config.precision}), shared weights stored once: {s['shared_single_copy']}")
    if "verify" in report:
        v = report["verify"]
        print(f"verified against PyTorch: max |logit diff| {v['logit_max_abs_diff']:.3g}, "
              f"argmax agreement {v['argmax_agreement']:.2f}", file=sys.stderr)
