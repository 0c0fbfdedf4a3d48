"""A LLaMA-shaped HF checkpoint with random weights, written shard by shard in bf16: the scale test subject.

    python benchmarks/make_random_llama.py --size 7b --out /data/llama2-7b-random

7b has LLaMA-2-7B's shape and file layout (32 layers, hidden 4096, 32 heads, intermediate 11008,
vocab 32000; model-0000N-of-0000M.safetensors + model.safetensors.index.json). 1b and 0.1b are the
same family scaled down. Weights are N(0, 0.02) and norms 1, so quality numbers on these models mean
nothing: they exist for time and memory. The tokenizer is a byte-level BPE with 32000 tokens trained
on the built-in texts (no download). Peak memory is about one tensor: nothing is held across tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path; its neighbours would shadow gguf and onnx.
HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from flexiedge.cache import atomic_dir  # noqa: E402
from flexiedge.data import CALIBRATION_TEXTS, TRAIN_TEXTS, read_text  # noqa: E402
from flexiedge.tensorfile import INDEX, SafetensorsWriter  # noqa: E402

SHAPES = {  # name -> (hidden, intermediate, layers, heads)
    "0.1b": (768, 2048, 12, 12),
    "1b": (2048, 5504, 22, 16),
    "7b": (4096, 11008, 32, 32),
}
VOCAB = 32000
SHARD_BYTES = 5 * 2**30


def llama_config(size: str) -> dict:
    hidden, ffn, layers, heads = SHAPES[size]
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
                torch_dtype="bfloat16", initializer_range=0.02)


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of LlamaForCausalLM, in the order HF writes them."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def shards(shapes, limit: int = SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups, size = [[]], 0
    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * 2
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def random_tensor(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def byte_level_tokenizer(vocab_size: int = VOCAB):
    """A GPT-2 style byte-level BPE trained on the built-in texts (LLaMA-2's own is SentencePiece)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([read_text(t) for t in CALIBRATION_TEXTS + TRAIN_TEXTS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_model(size: str, out: Path, seed: int = 0, overwrite: bool = False) -> Path:
    cfg = llama_config(size)
    groups = shards(tensor_shapes(cfg))
    generator = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() for g in groups for _, s in g)
    weight_map = {}
    with atomic_dir(out, overwrite=overwrite) as tmp, tqdm(total=total * 2, unit="B", unit_scale=True,
                                                            desc=f"random {size}") as bar:
        for k, group in enumerate(groups, 1):
            file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            entries = [(name, torch.bfloat16, shape) for name, shape in group]
            with SafetensorsWriter(tmp / file, entries, {"format": "pt"}) as w:
                for name, shape in group:
                    w.write(name, random_tensor(name, shape, generator))
                    weight_map[name] = file
                    bar.update(torch.Size(shape).numel() * 2)
        (tmp / INDEX).write_text(json.dumps(dict(metadata=dict(total_size=total * 2), weight_map=weight_map), indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        byte_level_tokenizer(cfg["vocab_size"]).save_pretrained(tmp)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SHAPES), default="7b")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    write_model(args.size, args.out, args.seed, args.force)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
