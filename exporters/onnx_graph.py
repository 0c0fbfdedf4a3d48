"""Graph passes on an ONNX ModelProto that keep every shared weight stored once.

torch.onnx (dynamo) lifts a Parameter once, whatever the number of layers that use it, but each use
reaches its MatMul through its own Transpose (`F.linear` computes x W^T). onnxruntime's quantizers only
quantize a MatMul whose weight is an initializer, so they would skip those; and constant folding would
give each use its own transposed copy. `fold_weight_transposes` folds them into ONE transposed
initializer per (weight, perm), shared by every MatMul. `deduplicate_initializers` is the safety net for
equal-valued but distinct tensors (the plan, not bytes, is the source of truth about sharing).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

MATMUL_OPS = ("MatMul", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul", "Gemm")
_LAYER = re.compile(r"/model/layers\.(\d+)/")


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    uses = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            uses[name].append(node)
    return uses


def rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    """Point every node input (and graph output) named `old` at `new`."""
    for node in model.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def _unique_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace Identity(W) by W and Transpose(W) by one pre-transposed initializer W.T per (W, perm).

    An initializer that is also used untransposed (a tied embedding: Gather and lm_head) is left alone:
    folding it would store it twice. Returns the number of nodes removed.
    """
    inits, uses = initializers(model), consumers(model)
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    folded: dict[tuple[str, tuple[int, ...]], str] = {}
    removed = []
    for node in model.graph.node:
        if node.op_type not in ("Transpose", "Identity") or node.input[0] not in inits:
            continue
        source = node.input[0]
        if node.op_type == "Identity":
            rename_input(model, node.output[0], source)
            removed.append(node)
            continue
        if any(u.op_type != "Transpose" for u in uses[source]):
            continue
        array = numpy_helper.to_array(inits[source])
        perm = tuple(a.ints for a in node.attribute if a.name == "perm")
        perm = tuple(perm[0]) if perm else tuple(reversed(range(array.ndim)))
        if (source, perm) not in folded:
            name = _unique_name(source + ".T", taken)
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), name))
            folded[(source, perm)] = name
        rename_input(model, node.output[0], folded[(source, perm)])
        removed.append(node)
    for node in removed:
        model.graph.node.remove(node)
    remove_unused_initializers(model)
    return len(removed)


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _digest(tensor: onnx.TensorProto) -> tuple:
    array = numpy_helper.to_array(tensor)
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(array.tobytes()).hexdigest()


def deduplicate_initializers(model: onnx.ModelProto, min_bytes: int = 0) -> int:
    """Merge initializers with equal dtype, shape and bytes into the first one. Returns bytes saved."""
    first: dict[tuple, str] = {}
    saved = 0
    for tensor in list(model.graph.initializer):
        nbytes = numpy_helper.to_array(tensor).nbytes
        if nbytes < min_bytes:
            continue
        key = _digest(tensor)
        if key in first:
            rename_input(model, tensor.name, first[key])
            saved += nbytes
        else:
            first[key] = tensor.name
    remove_unused_initializers(model)
    return saved


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (each name once), from their shapes: works without loading external data."""
    def nbytes(t: onnx.TensorProto) -> int:
        return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return sum(nbytes(t) for t in model.graph.initializer)


def layer_of(node: onnx.NodeProto) -> int | None:
    match = _LAYER.search(node.name)
    return int(match.group(1)) if match else None


def matmul_weights(model: onnx.ModelProto) -> dict[str, set[int]]:
    """Weight initializer (a MatMul's B input, seen through a Cast) -> layers whose MatMuls read it."""
    inits = initializers(model)
    cast_of = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    layers = defaultdict(set)
    for node in model.graph.node:
        if node.op_type in MATMUL_OPS and len(node.input) > 1:
            weight = cast_of.get(node.input[1], node.input[1])
            if weight in inits:
                layers[weight].add(layer_of(node))
    return layers


def shared_weights(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Weights read by MatMuls of more than one layer: name -> sorted layer positions."""
    return {name: sorted(found - {None}) for name, found in matmul_weights(model).items()
            if len(found - {None}) > 1}


def name_nodes(model: onnx.ModelProto, prefix: str = "") -> None:
    """Readable node names from the exporter's module scopes, like `/model/layers.3/self_attn/q_proj/MatMul`,
    then drop the exporter's per-node metadata (stack traces: large, and of no use in a shipped file)."""
    taken: set[str] = set()
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = eval_scopes(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        module = scopes[-2] if len(scopes) >= 2 else ""
        if prefix and module.startswith(prefix):
            module = module[len(prefix):]
        path = "/" + re.sub(r"\.(?!\d)", "/", module) if module else ""
        node.name = _unique_name(f"{path}/{node.op_type}", taken)
        del node.metadata_props[:]


def eval_scopes(text: str) -> list[str]:
    """Parse the exporter's "['', 'm', 'm.model', ...]" list without eval."""
    return re.findall(r"'([^']*)'", text)


def rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a graph input/output value everywhere it appears."""
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]


def store_as_fp16(model: onnx.ModelProto) -> None:
    """Store float matrices (ndim >= 2) as fp16, each behind ONE Cast to fp32 shared by all its users.

    Compute stays fp32 (CPU kernels are fp32); 1-D tensors (norm gammas, rotary frequencies) stay fp32,
    since fp16 rotary frequencies would shift positions.
    """
    uses = consumers(model)
    casts = []
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)
        tensor.CopyFrom(half)
        wide = tensor.name + ".fp32"
        for node in uses[tensor.name]:
            node.input[:] = [wide if x == tensor.name else x for x in node.input]
        casts.append(onnx.helper.make_node("Cast", [tensor.name], [wide], name=f"/{tensor.name}/Cast",
                                           to=onnx.TensorProto.FLOAT))
    for i, cast in enumerate(casts):
        model.graph.node.insert(i, cast)
