"""Streaming ONNX export: the graph is traced on the meta device, each weight is read when it is written.

    flexiedge export onnx runs/llama7b-30 --out exports/llama7b-30-int4 --precision int4 --stream

The in-memory exporter (`onnx.export_onnx`) holds the fp32 model, the traced ModelProto and its
quantised copy at once: several times a 7B model. Here nothing holds more than a few tensors:

  1. trace   `build_skeleton` gives the plan's model with meta tensors (slots tied to their base
             Parameter by identity, so a shared weight is lifted ONCE); the dynamo exporter traces it
             with meta inputs into an `onnx_ir` graph whose initializers hold no bytes.
  2. passes  the same renames and folds as the in-memory path (`trace`, `name_shared_weights`,
             `fold_weight_transposes`), on the onnx_ir graph. Each initializer remembers its *source*:
             (checkpoint tensor, permutation).
  3. storage every initializer becomes an `ir.LazyTensor` that reads its source from model.safetensors
             (`TensorFiles`: plain reads, no mmap) when `ir.save` writes it. fp16 stores matrices
             behind one Cast each; int8/int4 turn each weight MatMul into com.microsoft MatMulNBits with
             blocks computed by onnxruntime's own kernel, once per weight, shared by all its readers.

The files are those of the in-memory path (model.onnx, ONE model.onnx.data, genai_config.json,
flexiedge-export.json, tokenizer), and are verified the same way: stored bytes, one copy per shared
weight, and logits against PyTorch when the model is small enough to load (`VERIFY_LOGITS_UP_TO`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flexiedge.cache import atomic_dir
from flexiedge.errors import FlexiEdgeError
from flexiedge.memory import peak_rss_bytes
from flexiedge.plan import Plan
from flexiedge.tensorfile import TensorFiles

from . import onnx_graph as graph

# Sizes (as fp32) above which `export_onnx` streams by default, and up to which the streaming path
# still checks logits against PyTorch (that loads the model in fp32).
STREAM_ABOVE_BYTES = 2 * 2**30
VERIFY_LOGITS_UP_TO = 2 * 2**30
# Initializers up to this size (fp32) are compared by content and merged, as `deduplicate_initializers`
# does in memory (equal output-norm gammas, zero LoRA factors); larger ones are never equal by accident.
DEDUP_UP_TO_BYTES = 4 * 2**20


# ------------------------------------------------------------------------------------------------
# the source: plan, config and lazily read weights


@dataclass
class StreamSource:
    """A run folder (or plain HF folder) as the streaming exporter sees it: nothing loaded but headers."""
    path: Path
    plan: Plan
    config: object                      # transformers PretrainedConfig of the plan's stack
    tensors: TensorFiles
    metadata: dict = field(default_factory=dict)

    @classmethod
    def open(cls, spec, verify: bool = True) -> "StreamSource":
        from transformers import AutoConfig

        from flexiedge.checkpoint import METADATA, checked_weights, is_plain_model, read_metadata
        from flexiedge.models import BUILTIN_MODELS, check_architecture, resolve_model_dir

        path = resolve_model_dir(spec) if str(spec) in BUILTIN_MODELS else Path(spec)
        if path.suffix == ".gguf" or not (path / "config.json").is_file():
            raise FlexiEdgeError(f"{path}: streaming export needs a run folder or an HF folder with safetensors "
                                 "weights (config.json + model.safetensors)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if is_plain_model(path) and not (path / METADATA).exists():
            check_architecture(path)      # a run's was checked when it was pruned
            return cls(path, Plan.identity(config.num_hidden_layers), config, TensorFiles.open(path))
        metadata = read_metadata(path)
        weights = checked_weights(path, metadata, verify)
        return cls(path, Plan.from_json(metadata["plan"]), config, TensorFiles.open(weights), metadata)

    def stored_names(self) -> list[str]:
        """Checkpoint tensors the model uses (a plain tied model may also store lm_head: skip it)."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        return [n for n in self.tensors.names if not (tied and n == "lm_head.weight")]

    def unique_parameters(self) -> int:
        return sum(self.tensors.info(n).numel for n in self.stored_names())

    def fp32_bytes(self) -> int:
        return 4 * self.unique_parameters()

    def all_fp32(self) -> bool:
        return all(self.tensors.info(n).dtype == torch.float32 for n in self.stored_names())

    def close(self) -> None:
        self.tensors.close()


def wants_streaming(run_dir, streaming: bool | None) -> bool:
    """`streaming` if given; else stream when the checkpoint would be over STREAM_ABOVE_BYTES in fp32, or
    stores bf16/fp16 (the in-memory trace would then compute in that dtype; this path widens to fp32)."""
    if streaming is not None:
        return streaming
    try:
        source = StreamSource.open(run_dir, verify=False)
    except (FlexiEdgeError, OSError, ValueError):
        return False                      # GGUF or odd folders: the in-memory path reports the problem
    try:
        return source.fp32_bytes() > STREAM_ABOVE_BYTES or not source.all_fp32()
    finally:
        source.close()


# ------------------------------------------------------------------------------------------------
# 1. trace on the meta device


def meta_model(source: StreamSource):
    """The plan's model with meta tensors; slots share their base's Parameter, a tied head its embedding."""
    from flexiedge.build import build_skeleton

    model = build_skeleton(source.config, source.plan)
    model.float()            # a bf16 config (torch_dtype) builds bf16 tensors: the graph computes in fp32
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device("meta"):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model.eval()


def trace_meta(source: StreamSource, opset: int = 18):
    """The dynamo trace of the meta model as an onnx_ir Model (initializers without bytes), and the
    non-persistent buffers (rotary frequencies: not in the checkpoint) computed on the CPU by name."""
    from .onnx import example_inputs, export_program

    model = meta_model(source)
    rotary = type(model.model.rotary_emb)(config=model.config)
    buffers = {f"model.rotary_emb.{n}": b for n, b in rotary.named_buffers()}
    with torch.device("meta"):
        inputs = example_inputs(model.config)
    return export_program(model, inputs, opset).model, buffers


# ------------------------------------------------------------------------------------------------
# 2. graph passes on onnx_ir (the in-memory path's, without bytes)


def name_values(model, plan: Plan) -> None:
    """optimum's I/O names, readable node names, initializers under their checkpoint names (a shared weight
    under its base block's), exactly as `onnx.trace` and `onnx.name_shared_weights` name them."""
    from flexiedge.plan import PROJECTIONS

    from .onnx import io_names

    g = model.graph
    inputs, outputs = io_names(len(plan.layers))
    for value, name in zip(g.inputs, inputs):
        value.name = name
    for value, name in zip(g.outputs, outputs):
        value.name = name
    taken: set[str] = set()
    for node in g:
        scopes = graph.eval_scopes(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        module = scopes[-2] if len(scopes) >= 2 else ""
        module = module[len("model."):] if module.startswith("model.") else module
        path = "/" + re.sub(r"\.(?!\d)", "/", module) if module else ""
        node.name = graph._unique_name(f"{path}/{node.op_type}", taken)
        node.metadata_props.clear()
    for value in list(g.initializers.values()):
        if value.name.startswith("model."):
            value.name = value.name[len("model."):]
    for position in plan.slots:
        base = plan.layers[position].shares
        for proj in PROJECTIONS:
            for kind in ("weight", "bias"):
                slot_name, base_name = (f"model.layers.{p}.{proj}.{kind}" for p in (position, base))
                if slot_name in g.initializers and base_name not in g.initializers:
                    g.initializers[slot_name].name = base_name
    # a tied embedding may be lifted under the head's name: give it the name it is stored under
    if "lm_head.weight" in g.initializers and "model.embed_tokens.weight" not in g.initializers and \
            any(node.op_type == "Gather" for node, _ in g.initializers["lm_head.weight"].uses()):
        g.initializers["lm_head.weight"].name = "model.embed_tokens.weight"


def _replace(old, new) -> None:
    """Every use of value `old` (graph outputs included) now reads `new`."""
    from onnx_ir.convenience import replace_all_uses_with
    replace_all_uses_with(old, new, replace_graph_outputs=True)


def _new_initializer(g, name: str, dtype, shape, tensor, source=None):
    import onnx_ir as ir

    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=tensor)
    if source is not None:
        value.meta["source"] = source
    g.register_initializer(value)
    return value


def fold_transposes(model) -> int:
    """`onnx_graph.fold_weight_transposes` on onnx_ir: Identity(W) -> W; Transpose(W) -> one initializer
    W.T per (W, perm), its source (name, perm) to be read and transposed when written. A weight also
    used untransposed (a tied embedding) is left alone. Returns the number of nodes removed."""
    g = model.graph
    taken = set(g.initializers) | {v.name for n in g for v in n.outputs}
    removed = 0
    for value in list(g.initializers.values()):
        for node, _ in list(value.uses()):
            if node.op_type == "Identity":
                _replace(node.outputs[0], value)
                g.remove(node, safe=True)
                removed += 1
        uses = list(value.uses())
        if not uses or any(node.op_type != "Transpose" for node, _ in uses):
            continue
        name, ndim = value.meta["source"][0], len(value.shape)
        folded = {}
        for node, _ in uses:
            perm = node.attributes.get("perm")
            perm = tuple(perm.as_ints()) if perm is not None else tuple(reversed(range(ndim)))
            if perm not in folded:
                shape = [value.shape[p] for p in perm]
                folded[perm] = _new_initializer(g, graph._unique_name(value.name + ".T", taken), value.dtype,
                                                shape, value.const_value, source=(name, perm))
            _replace(node.outputs[0], folded[perm])
            g.remove(node, safe=True)
            removed += 1
        g.initializers.pop(value.name)
    return removed


# ------------------------------------------------------------------------------------------------
# 3. storage: lazy tensors read from the checkpoint


class WeightReader:
    """Initializer sources -> float32 arrays, one at a time, from the checkpoint (any float dtype)."""

    def __init__(self, source: StreamSource, buffers: dict[str, torch.Tensor]):
        self.tensors = source.tensors
        self.tied = getattr(source.config, "tie_word_embeddings", False)
        self.buffers = buffers            # computed, not stored (rotary frequencies)

    def file_name(self, name: str) -> str:
        if name in self.tensors or name in self.buffers:
            return name
        if self.tied and name == "lm_head.weight":
            return "model.embed_tokens.weight"
        raise FlexiEdgeError(f"the traced graph needs tensor {name}, which the checkpoint lacks: the checkpoint "
                             "is incomplete or does not match its plan")

    def read(self, source: tuple[str, tuple[int, ...] | None]) -> np.ndarray:
        name, perm = source
        name = self.file_name(name)
        t = self.buffers[name] if name in self.buffers else self.tensors.get(name, torch.float32)
        t = t.float()
        if perm is not None:
            t = t.permute(perm)
        return t.contiguous().numpy()

    def digest(self, source) -> str:
        return hashlib.sha256(self.read(source).tobytes()).hexdigest()


def attach_sources(model, reader: WeightReader) -> None:
    """Each initializer's source is its own (checkpoint) name, untransposed; check that it exists."""
    for value in model.graph.initializers.values():
        reader.file_name(value.name)
        value.meta["source"] = (value.name, None)


def deduplicate_small(model, reader: WeightReader, up_to: int = DEDUP_UP_TO_BYTES) -> int:
    """Merge small initializers with equal content into the first (`deduplicate_initializers`' job)."""
    g = model.graph
    first: dict[tuple, object] = {}
    merged = 0
    for value in list(g.initializers.values()):
        shape = tuple(value.shape)
        if 4 * int(np.prod(shape, dtype=np.int64)) > up_to:
            continue
        key = (value.dtype, shape, reader.digest(value.meta["source"]))
        if key in first:
            _replace(value, first[key])
            g.initializers.pop(value.name)
            merged += 1
        else:
            first[key] = value
    return merged


def lazy(fn, dtype, shape, name: str):
    import onnx_ir as ir
    return ir.LazyTensor(lambda: ir.Tensor(fn(), name=name), dtype=dtype, shape=ir.Shape(shape), name=name)


def store_fp32(model, reader: WeightReader) -> None:
    import onnx_ir as ir
    for value in model.graph.initializers.values():
        source = value.meta["source"]
        value.const_value = lazy(lambda s=source: reader.read(s), ir.DataType.FLOAT, value.shape, value.name)


def store_fp16(model, reader: WeightReader) -> None:
    """`onnx_graph.store_as_fp16`: float matrices (ndim >= 2) stored as fp16, each behind ONE Cast."""
    import onnx_ir as ir

    g = model.graph
    casts = []
    for value in list(g.initializers.values()):
        if value.dtype != ir.DataType.FLOAT or len(value.shape) < 2:
            continue
        wide = ir.Value(name=value.name + ".fp32", type=ir.TensorType(ir.DataType.FLOAT), shape=value.shape)
        _replace(value, wide)
        source = value.meta["source"]
        value.const_value = lazy(lambda s=source: reader.read(s).astype(np.float16), ir.DataType.FLOAT16,
                                 value.shape, value.name)
        value.type = ir.TensorType(ir.DataType.FLOAT16)
        casts.append(ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, outputs=[wide],
                             name=f"/{value.name}/Cast"))
    if casts:
        g.insert_before(g.node(0), casts)


# --- int8 / int4: MatMulNBits, mirroring onnxruntime's MatMulNBitsQuantizer (QOperator format) ---------


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """(K, N) fp32 weight -> (packed uint8 (N, K blocks, blob), scales fp32 (N, K blocks), zero points
    uint8 (N, ceil(K blocks / (8 / bits)))): onnxruntime's C++ kernel, as `qbits_block_quant` calls it."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape
    kpack = 8 // bits
    k_blocks = (rows + block_size - 1) // block_size
    if k_blocks * block_size > rows:
        weight = np.pad(weight, ((0, k_blocks * block_size - rows), (0, 0)), "constant")
    packed = np.zeros((cols, k_blocks, (block_size + kpack - 1) // kpack), dtype=np.uint8)
    zero_points = np.zeros((cols, (k_blocks + kpack - 1) // kpack), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, np.ascontiguousarray(weight), scales, zero_points, block_size, cols, rows, symmetric)
    return packed, scales, zero_points


class QuantizedWeight:
    """One weight's blocks, computed on first use and dropped once each of its tensors has been taken."""

    def __init__(self, reader: WeightReader, source, bits: int, block_size: int, symmetric: bool):
        self.reader, self.source = reader, source
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.parts = 2 if symmetric else 3
        self._blocks, self._taken = None, set()

    def part(self, i: int) -> np.ndarray:
        if self._blocks is None:
            self._blocks = quantize_blocks(self.reader.read(self.source), self.bits, self.block_size, self.symmetric)
        out = self._blocks[i]
        self._taken.add(i)
        if len(self._taken) == self.parts:
            self._blocks, self._taken = None, set()
        return out


def is_quantizable(node, g, quantize_adapters: bool) -> bool:
    """A MatMul whose B is a 2-D float initializer (LoRA factors only with `quantize_adapters`)."""
    import onnx_ir as ir

    if node.op_type != "MatMul" or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    weight = node.inputs[1]
    if weight.name not in g.initializers or len(weight.shape) != 2 or weight.dtype != ir.DataType.FLOAT:
        return False
    return quantize_adapters or not any(v is not None and "lora_" in v.name for v in node.inputs)


def nbits_shapes(k: int, n: int, bits: int, block_size: int) -> list[tuple[int, ...]]:
    """Shapes of MatMulNBits' B, scales and zero points for a (K, N) weight (see `quantize_blocks`)."""
    k_blocks, kpack = (k + block_size - 1) // block_size, 8 // bits
    return [(n, k_blocks, (block_size + kpack - 1) // kpack), (n, k_blocks), (n, (k_blocks + kpack - 1) // kpack)]


def quantized_initializers(g, weight, reader: WeightReader, bits: int, block_size: int, symmetric: bool) -> list:
    """B, scales (and zero points) of one weight as lazy initializers named as onnxruntime's quantizer
    names them, sharing one `QuantizedWeight`, registered next to each other."""
    import onnx_ir as ir

    blocks = QuantizedWeight(reader, weight.meta["source"], bits, block_size, symmetric)
    k, n = (int(d) for d in weight.shape)
    parts = zip([f"_Q{bits}", "_scales", "_zero_points"], [ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8],
                nbits_shapes(k, n, bits, block_size))
    return [_new_initializer(g, weight.name + suffix, dtype, shape,
                             lazy(lambda i=i: blocks.part(i), dtype, shape, weight.name + suffix))
            for i, (suffix, dtype, shape) in enumerate(list(parts)[:blocks.parts])]


def store_nbits(model, reader: WeightReader, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                quantize_adapters: bool) -> int:
    """Each weight MatMul -> MatMulNBits; ONE set of blocks per weight, shared by all its MatMuls (a shared
    block's base and slots). Everything else stays fp32. Returns the number of MatMulNBits nodes."""
    import onnx_ir as ir

    g = model.graph
    store_fp32(model, reader)
    quantized: dict[str, list] = {}
    count = 0
    for node in list(g):
        if not is_quantizable(node, g, quantize_adapters):
            continue
        weight = node.inputs[1]
        if weight.name not in quantized:
            quantized[weight.name] = quantized_initializers(g, weight, reader, bits, block_size, symmetric)
        k, n = (int(d) for d in weight.shape)
        attributes = dict(K=k, N=n, bits=bits, block_size=block_size)
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        output = node.outputs[0]
        new = ir.node("MatMulNBits", [node.inputs[0], *quantized[weight.name]], attributes, domain="com.microsoft",
                      name=f"{node.name}_Q{bits}")
        new.outputs[0].name, new.outputs[0].type, new.outputs[0].shape = output.name + "_Q", output.type, output.shape
        g.insert_after(node, new)
        _replace(output, new.outputs[0])
        g.remove(node, safe=True)
        new.outputs[0].name = output.name
        count += 1
    for name in quantized:
        if not list(g.initializers[name].uses()):
            g.initializers.pop(name)
    if count:
        model.opset_imports["com.microsoft"] = 1
    return count


def apply_precision(model, reader: WeightReader, config) -> None:
    if config.precision == "fp32":
        store_fp32(model, reader)
    elif config.precision == "fp16":
        store_fp32(model, reader)
        store_fp16(model, reader)
    else:
        store_nbits(model, reader, 8 if config.precision == "int8" else 4, config.block_size, config.symmetric,
                    config.accuracy_level, config.quantize_adapters)


def order_initializers(model) -> None:
    """Initializers in first-use order (a weight's quantised parts next to each other): the writer then
    reads the checkpoint roughly front to back and a weight's blocks are freed right after they are written."""
    g = model.graph
    order = []
    seen = set()
    for node in g:
        for value in node.inputs:
            if value is not None and value.name in g.initializers and value.name not in seen:
                seen.add(value.name)
                order.append(value)
    rest = [v for name, v in g.initializers.items() if name not in seen]
    for value in order + rest:
        g.initializers.pop(value.name)
    for value in order + rest:
        g.register_initializer(value)


# ------------------------------------------------------------------------------------------------
# export


@dataclass
class StreamTrace:
    """A traced, named and folded graph at fp32 whose initializers know their sources but hold no bytes;
    `with_precision` turns a copy of it into a savable model (one trace serves several precisions)."""
    source: StreamSource
    model: object                         # onnx_ir Model
    reader: WeightReader


def trace_stream(source: StreamSource, opset: int = 18) -> StreamTrace:
    model, buffers = trace_meta(source, opset)
    reader = WeightReader(source, buffers)
    name_values(model, source.plan)
    attach_sources(model, reader)
    fold_transposes(model)
    deduplicate_small(model, reader)
    return StreamTrace(source, model, reader)


def with_precision(traced: StreamTrace, config):
    """A copy of the traced graph with lazy storage at `config.precision`, ready for `save_streaming`."""
    model = traced.model.clone()
    for name, value in model.graph.initializers.items():
        value.meta["source"] = traced.model.graph.initializers[name].meta["source"]
    apply_precision(model, traced.reader, config)
    order_initializers(model)
    return model


def save_streaming(model, folder: Path) -> None:
    """model.onnx + ONE data file, written one tensor at a time (serial writer: one tensor in flight)."""
    import onnx_ir as ir

    from .onnx import DATA_FILE, MODEL_FILE

    if (folder / DATA_FILE).exists():
        raise FileExistsError(f"{folder / DATA_FILE} exists: write into a fresh folder")
    ir.save(model, folder / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=0)


def export_onnx_streaming(run_dir, out: Path, config=None, overwrite: bool = False) -> dict:
    """Export a run (or plain HF folder) without loading it: see the module docstring."""
    from .onnx import OnnxExportConfig

    config = config or OnnxExportConfig()
    config.check()
    if Path(out).exists() and not overwrite:  # fail before the trace, not after it
        raise FlexiEdgeError(f"{out} already exists: choose another --out or pass --force to replace it")
    started = time.perf_counter()
    source = StreamSource.open(run_dir)
    try:
        traced = trace_stream(source, config.opset)
        return write_streaming(traced, Path(out), config, overwrite, seconds_trace=time.perf_counter() - started)
    finally:
        source.close()


def write_streaming(traced: StreamTrace, out: Path, config, overwrite: bool = False,
                    seconds_trace: float | None = None) -> dict:
    """Write one precision of a streaming trace; verify storage, and logits against PyTorch when the
    model is at most VERIFY_LOGITS_UP_TO in fp32. Returns the report written to flexiedge-export.json."""
    from transformers import AutoTokenizer

    from .onnx import GENAI_CONFIG, REPORT, check_storage, genai_config, logit_parity, storage_of, versions

    config.check()
    source = traced.source
    started = time.perf_counter()
    model = with_precision(traced, config)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        save_streaming(model, tmp)
        del model
        seconds_save = time.perf_counter() - started
        tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        tokenizer.save_pretrained(tmp)
        (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(source.config, tokenizer), indent=2))
        s = storage_of(tmp, source.unique_parameters(), source.plan, config.precision)
        report = dict(source=str(source.path), method=source.plan.method, config=asdict(config),
                      plan=source.plan.to_json(), storage=s, versions=versions(), streaming=True)
        report["resources"] = dict(seconds_trace=seconds_trace, seconds_save=seconds_save,
                                   peak_rss_bytes=peak_rss_bytes())
        if config.verify:
            check_storage(s, config.precision)
            if source.fp32_bytes() <= VERIFY_LOGITS_UP_TO:
                report["verify"] = logit_parity(tmp, fp32_checkpoint(source.path), config.precision)
            else:
                report["verify_skipped"] = (f"logits not compared with PyTorch: the model is "
                                            f"{source.fp32_bytes() / 2**30:.1f} GiB in fp32, over "
                                            f"{VERIFY_LOGITS_UP_TO / 2**30:.0f} GiB")
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report


def fp32_checkpoint(path: Path):
    """The checkpoint in PyTorch, in fp32 (the export computes in fp32 whatever the checkpoint stores)."""
    from flexiedge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, verify=False)   # StreamSource.open checked the checksum
    ckpt.model.float()
    return ckpt
