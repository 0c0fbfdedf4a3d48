"""Analytic footprints from shapes + plan, for models too large to export here (LLaMA-2-7B pruned at 30%).

ESTIMATED ON PAPER, not from a file: sizes follow the exporters' rules.
  GGUF Q4_K (exporters/gguf.py, llama.cpp "pure" Q4_K_S): every matrix Q4_K (144 B per 256 weights) when
    its rows are a multiple of 256, norms F32, adapters Q8_0 (34 B per 32). Metadata (tokenizer) not counted.
  ONNX int4 (exporters/onnx.py, MatMulNBits, block 32, asymmetric): per 32 weights 16 B of nibbles + a fp32
    scale + a 4-bit zero point = 20.5 B; the embedding (a Gather) and the adapters stay fp32.
Slots share their base block's weights (stored once, read once per use) and add rank-r adapters on the
seven projections plus two slot RMSNorms and two output norms.
"""

from __future__ import annotations

from dataclasses import dataclass

from .footprint import Footprint

PROJ_SHAPES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projections(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of q, k, v, o, gate, up, down."""
        kv = self.kv_heads * self.head_dim
        h, f = self.hidden, self.ffn
        return [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]


LLAMA2_7B = Shape(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000)


@dataclass(frozen=True)
class Format:
    """Bytes per weight of a stored matrix, of the embedding, of an adapter factor and of a norm."""
    name: str
    runtime: str
    matrix: float
    embedding: float
    adapter: float
    norm: float = 4.0
    kv: int = 2


GGUF_Q4_K = Format("q4_k", "llamacpp", matrix=144 / 256, embedding=144 / 256, adapter=34 / 32)
ONNX_INT4 = Format("int4", "onnxruntime", matrix=(16 + 4 + 0.5) / 32, embedding=4.0, adapter=4.0, kv=4)


def footprint(shape: Shape, fmt: Format, method: str, pruned: int, rank: int = 256, name: str = "") -> Footprint:
    """The footprint of `shape` with `pruned` blocks removed (shortgpt) or turned into slots (flexigpt)."""
    block = sum(i * o for i, o in shape.projections())
    adapter = sum(rank * (i + o) for i, o in shape.projections())
    kept = shape.layers - pruned
    slots = pruned if method == "flexigpt" else 0
    layers = kept + slots
    norms = (2 * layers + 2 * slots + 1) * shape.hidden * fmt.norm  # pre-norms, slot output norms, final norm
    embd = shape.vocab * shape.hidden
    head = 0 if shape.tied else embd * fmt.matrix
    stored = kept * block * fmt.matrix + slots * adapter * fmt.adapter + embd * fmt.embedding + head + norms
    read = (layers * block * fmt.matrix + slots * adapter * fmt.adapter + shape.hidden * fmt.embedding
            + (head or embd * fmt.embedding) + norms)
    return Footprint(name=name or f"{method}-{fmt.name}", runtime=fmt.runtime, type=fmt.name, method=method,
                     path="(analytic)", file_bytes=int(stored), unique_bytes=int(stored),
                     weight_bytes_per_token=int(read), matmul_params_per_token=layers * block + slots * adapter + embd,
                     kv_bytes_per_position=2 * layers * shape.kv_heads * shape.head_dim * fmt.kv, layers=layers,
                     heads=shape.heads, head_dim=shape.head_dim, slots=slots)


def llama7b_footprints(pruned: int = 9, rank: int = 256) -> list[Footprint]:
    """LLaMA-2-7B unpruned, ShortGPT and FlexiGPT at 9 of 32 blocks (the paper's "30%"), GGUF Q4_K and ONNX int4."""
    out = []
    for fmt in (GGUF_Q4_K, ONNX_INT4):
        out.append(footprint(LLAMA2_7B, fmt, "unpruned", 0, name=f"llama7b-unpruned-{fmt.name}"))
        for method in ("shortgpt", "flexigpt"):
            out.append(footprint(LLAMA2_7B, fmt, method, pruned, rank, name=f"llama7b-30-{method}-{fmt.name}"))
    return out
