"""What an exported model costs: bytes stored, bytes resident, bytes read and FLOPs per generated token.

Sharing shrinks what is stored and resident (each base weight once, mmapped once) but not what is read per
token: every slot still streams its base block's weights (METHOD.md, "What this means for deployment").
So `unique_bytes` counts each tensor's bytes once, while `weight_bytes_per_token` walks the layers of
the plan and counts a shared weight once per layer that uses it, plus adapters, norms, one embedding row
and the output head (the whole embedding matrix when it is tied).

    fp = footprint("runs/exports/devices/flexigpt-gguf-q8_0")   # or an ONNX export folder
    fp.bytes_per_token(position=192), fp.flops_per_token(192), fp.resident_bytes(n_ctx=512)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from flexiedge.errors import FlexiEdgeError

GGUF_PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class Footprint:
    name: str
    runtime: str                    # llamacpp | onnxruntime
    type: str                       # q8_0, f16, int8, fp32, ...
    method: str                     # unpruned | shortgpt | flexigpt
    path: str
    file_bytes: int                 # every file the runtime opens (model + adapters / external data)
    unique_bytes: int               # weight payload, each tensor once
    weight_bytes_per_token: int     # weight payload read per generated token, shared weights once per use
    matmul_params_per_token: int    # multiply-accumulates per token in weight matmuls
    kv_bytes_per_position: int      # KV cache bytes one position adds (all layers, K and V)
    layers: int
    heads: int
    head_dim: int
    slots: int = 0

    def bytes_per_token(self, position: int) -> int:
        """Weights plus the KV cache read when the new token attends over `position` earlier ones."""
        return self.weight_bytes_per_token + self.kv_bytes_per_position * position

    def flops_per_token(self, position: int) -> int:
        """2 x MACs: weight matmuls + attention scores and weighted sum (QK^T and AV) over `position` keys."""
        return 2 * self.matmul_params_per_token + 4 * self.layers * self.heads * self.head_dim * position

    def resident_bytes(self, n_ctx: int, overhead_bytes: int = 0) -> int:
        """Weights mmapped once + a full KV cache + runtime buffers."""
        return self.unique_bytes + self.kv_bytes_per_position * n_ctx + overhead_bytes

    def as_dict(self) -> dict:
        return asdict(self)


def footprint(artifact: str | Path) -> Footprint:
    """The footprint of an export folder (GGUF: model.gguf [+ adapters.gguf]; ONNX: genai_config.json)."""
    path = Path(artifact)
    if path.suffix == ".gguf" or (path / "model.gguf").is_file():
        return gguf_footprint(path)
    if (path / "genai_config.json").is_file():
        return onnx_footprint(path)
    raise FlexiEdgeError(f"{path} is not an export: expected a folder with model.gguf (flexiedge export gguf) "
                         "or genai_config.json (flexiedge export onnx), or a .gguf file")


def _report(folder: Path) -> dict:
    f = folder / "flexiedge-export.json"
    return json.loads(f.read_text()) if f.is_file() else {}


# --- GGUF ---------------------------------------------------------------------------------------------------

def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def gguf_slots(reader) -> dict[int, int]:
    """The plan's slot map (slot layer -> base layer) as the exporter wrote it into model.gguf."""
    plan = _field(reader, "flexiedge.plan")
    return {int(k): int(v) for k, v in json.loads(plan)["slots"].items()} if plan else {}


def gguf_footprint(path: Path) -> Footprint:
    import gguf

    model = path if path.suffix == ".gguf" else path / "model.gguf"
    adapters = model.with_name("adapters.gguf")
    reader = gguf.GGUFReader(model)
    tensors = {t.name: t for t in reader.tensors}
    arch = _field(reader, "general.architecture")
    n_layer = int(_field(reader, f"{arch}.block_count"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length") or hidden // n_head)
    slots = gguf_slots(reader)
    read, macs = _gguf_layer_reads(tensors, slots, n_layer)
    embd = tensors["token_embd.weight"]
    head = tensors.get("output.weight", embd)  # tied: the head reads the whole embedding matrix
    read += int(embd.n_bytes) // int(embd.shape[-1]) + int(head.n_bytes) + int(tensors["output_norm.weight"].n_bytes)
    macs += int(head.n_elements)
    unique = sum({int(t.data_offset): int(t.n_bytes) for t in reader.tensors}.values())
    files = [model]
    if adapters.is_file():
        ad = gguf.GGUFReader(adapters).tensors
        read += sum(int(t.n_bytes) for t in ad)
        unique += sum(int(t.n_bytes) for t in ad)
        macs += sum(int(t.n_elements) for t in ad)
        files.append(adapters)
    report = _report(model.parent)
    return Footprint(name=model.parent.name if path.is_dir() else model.stem, runtime="llamacpp",
                     type=report.get("config", {}).get("type", _file_type(reader)),
                     method=report.get("plan", {}).get("method", "unknown"), path=str(path),
                     file_bytes=sum(f.stat().st_size for f in files), unique_bytes=unique,
                     weight_bytes_per_token=read, matmul_params_per_token=macs,
                     kv_bytes_per_position=2 * n_layer * n_kv * head_dim * 2,  # K and V, f16 cache (the default)
                     layers=n_layer, heads=n_head, head_dim=head_dim, slots=len(slots))


def _gguf_layer_reads(tensors: dict, slots: dict[int, int], n_layer: int) -> tuple[int, int]:
    """(bytes, MACs) the layers read per token: a slot reads its base's projections, once per use."""
    read = macs = 0
    for p in range(n_layer):
        for name, t in tensors.items():
            if not name.startswith(f"blk.{p}."):
                continue
            proj = name.split(".")[2]
            if proj in GGUF_PROJ and p in slots:  # the plan says whose bytes these are; check the file agrees
                base = tensors[f"blk.{slots[p]}.{proj}.weight"]
                if name != base.name and int(t.data_offset) != int(base.data_offset) and t.n_bytes != base.n_bytes:
                    raise FlexiEdgeError(f"{name} should share blk.{slots[p]}.{proj}.weight by the plan")
            read += int(t.n_bytes)
            macs += int(t.n_elements) if proj in GGUF_PROJ else 0
    return read, macs


def _file_type(reader) -> str:
    import gguf
    ft = _field(reader, "general.file_type")
    return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").lower() if ft is not None else "unknown"


# --- ONNX ---------------------------------------------------------------------------------------------------

PASSTHROUGH = {"Transpose", "Cast", "Reshape", "Identity", "Unsqueeze", "Squeeze", "DequantizeLinear"}
MATMULS = {"MatMul", "Gemm", "MatMulNBits"}


def onnx_footprint(folder: Path) -> Footprint:
    import onnx

    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    proto = onnx.load_model(folder / decoder["filename"], load_external_data=False)
    read, macs, unique = _onnx_reads(proto.graph)
    kv_type = next(i for i in proto.graph.input if i.name.startswith("past_key_values")).type.tensor_type.elem_type
    kv_bytes = onnx.helper.tensor_dtype_to_np_dtype(kv_type).itemsize
    layers, kv_heads, head_dim = decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]
    report = _report(folder)
    plan = report.get("plan", {})
    files = [folder / decoder["filename"], *(folder / f for f in _external_files(proto))]
    return Footprint(name=folder.name, runtime="onnxruntime", type=report.get("config", {}).get("precision", "unknown"),
                     method=report.get("method", "unknown"), path=str(folder),
                     file_bytes=sum(f.stat().st_size for f in files), unique_bytes=unique,
                     weight_bytes_per_token=read, matmul_params_per_token=macs,
                     kv_bytes_per_position=2 * layers * kv_heads * head_dim * kv_bytes, layers=layers,
                     heads=decoder["num_attention_heads"], head_dim=head_dim,
                     slots=sum(1 for l in plan.get("layers", []) if l.get("shares") is not None))


def _external_files(proto) -> set[str]:
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def _tensor_bytes(t) -> int:
    import onnx
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _onnx_reads(graph) -> tuple[int, int, int]:
    """(bytes read per token, matmul MACs per token, unique bytes) from the graph's initializer uses.

    The exporter keeps ONE initializer per shared weight, feeding the MatMul of its base and of every slot,
    so counting consumers counts uses. A Gather of an initializer (the embedding) reads one row per token."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    read = macs = unique = 0
    for t in graph.initializer:
        size = _tensor_bytes(t)
        unique += size
        for node, i in _uses(t.name, consumers):
            if node.op_type == "Gather" and i == 0:
                read += size // t.dims[0]
            else:
                read += size
                macs += _macs(node, i, t)
    return read, macs, unique


def _uses(name: str, consumers: dict) -> list:
    """The nodes that compute with a value, looking through transposes, casts and dequantisation."""
    out = []
    for node, i in consumers.get(name, []):
        if node.op_type in PASSTHROUGH and i == 0:
            out += [u for o in node.output for u in _uses(o, consumers)]
        else:
            out.append((node, i))
    return out


def _macs(node, i: int, t) -> int:
    """Weight elements a matmul multiplies per token (MatMulNBits: its attributes K x N, weights only)."""
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs["K"] * attrs["N"] if i == 1 else 0
    if node.op_type in MATMULS and i == 1:
        n = 1
        for d in t.dims:
            n *= d
        return n
    return 0
