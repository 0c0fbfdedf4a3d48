"""Shared fixtures: tiny random LLaMA-family models (GQA included), a tiny BPE tokenizer, tiny runs."""

from __future__ import annotations

import pytest
import torch

TINY_TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, and what is the use of a book, thought Alice, without pictures or conversations? "
) * 40


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_tiny_config(arch: str = "llama", **overrides):
    """A small config of a supported architecture: 6 layers, hidden 64, 4 heads over 2 KV heads (GQA)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    fields.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(**fields)


def make_tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_tiny_config(arch, **overrides))
    # Random init leaves every block's output tiny next to its input; scale up the output projections
    # so blocks differ in influence, as in a trained model.
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.mul_(1 + 4 * (i % 3))
            layer.mlp.down_proj.weight.mul_(1 + 4 * ((i + 1) % 3))
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(arch='llama', **config_overrides) -> a seeded random model in eval mode."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) trained on a paragraph; vocab <= 320."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(TINY_TEXT)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, tiny_tokenizer):
    """Factory: a tiny model saved as a local HF folder (safetensors + tokenizer)."""
    def make(arch: str = "llama", **overrides):
        folder = tmp_path / f"tiny-{arch}"
        tiny_model(arch, **overrides).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return folder
    return make


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dir, tiny_text_file):
    """Factory: prune a tiny model into a run folder; keyword arguments go to PruneConfig."""
    from flexiedge.plan import PruneConfig
    from flexiedge.prune import CalibrationConfig, prune

    def make(arch: str = "llama", name: str = "run", **config):
        config.setdefault("blocks", 2)
        config.setdefault("rank", 4)
        calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=256, seq_len=64)
        return prune(str(tiny_model_dir(arch)), tmp_path / name, PruneConfig(**config), calibration)
    return make


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
    """The real built-in model (SmolLM2-135M), FlexiGPT-pruned at 30% with a short calibration, once a session."""
    from flexiedge.cli import main

    out = tmp_path_factory.mktemp("real") / "smollm2-30"
    assert main(["prune", "--ratio", "0.3", "--out", str(out), "--calib-tokens", "1024"]) == 0
    return out
