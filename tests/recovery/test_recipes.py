"""Recovery recipes: block-local warm start, distillation on cached top-k, and `--recipe paper` = the old trainer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flexiedge.checkpoint import load_checkpoint
from flexiedge.data import token_windows, tokenize_texts
from flexiedge.distill import Teacher, full_kl, topk_kl
from flexiedge.models import load_model
from flexiedge.recover import read_log, recover
from flexiedge.train_config import TrainConfig, config_from
from flexiedge.warmstart import block_error, capture_block_io, warm_start


def source_and_windows(ckpt, text_file, seq_len=32, tokens=512):
    source, _ = load_model(ckpt.metadata["provenance"]["source_folder"])
    windows = token_windows(tokenize_texts(ckpt.tokenizer, (str(text_file),)), seq_len, tokens)
    return source, windows


@pytest.mark.parametrize("steps", [0, 30])  # closed-form gammas only; gammas then Adam on the block error
def test_warm_start_reduces_block_local_error_below_svd_init(tiny_run, tiny_text_file, steps):
    ckpt = load_checkpoint(tiny_run())
    source, windows = source_and_windows(ckpt, tiny_text_file)
    blocks = [ckpt.plan.layers[p].source_block for p in ckpt.plan.slots]
    ios, kwargs = capture_block_io(source, blocks, windows, batch_size=4)
    before = {p: block_error(ckpt.model.model.layers[p], ios[b], kwargs, 4) for p, b in zip(ckpt.plan.slots, blocks)}
    report = warm_start(ckpt.model, ckpt.plan, source, windows, steps=steps, lr=1e-2, log=lambda *a: None)
    for p, b in zip(ckpt.plan.slots, blocks):
        after = block_error(ckpt.model.model.layers[p], ios[b], kwargs, 4)
        assert report[p]["error_svd_init"] == pytest.approx(before[p])
        assert after < before[p], (p, before[p], after)
        if steps:
            assert report[p]["error_fit"] < report[p]["error_gamma"]


def test_captured_block_io_reproduces_the_pruned_block(tiny_run, tiny_text_file):
    """The cached inputs/kwargs are the real ones: the source block run on them gives the cached outputs."""
    ckpt = load_checkpoint(tiny_run())
    source, windows = source_and_windows(ckpt, tiny_text_file)
    block = ckpt.plan.pruned[0]
    ios, kwargs = capture_block_io(source, [block], windows, batch_size=4)
    with torch.no_grad():
        out = source.model.layers[block](ios[block].inputs[:4], **kwargs)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, ios[block].outputs[:4])


def test_topk_kl_equals_full_kl_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 50) * 3, torch.randn(2, 5, 50) * 3
    logp, ids = F.log_softmax(teacher, -1).topk(50, dim=-1)
    torch.testing.assert_close(topk_kl(student, logp, ids), full_kl(student, teacher))
    # Independent reference: torch's kl_div (input = student log-probs, target = teacher log-probs).
    ref = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
    torch.testing.assert_close(topk_kl(student, logp, ids), ref.sum(-1).mean())
    # k < V: the KL of the coarsened distributions, never above the full KL (data processing inequality).
    logp, ids = F.log_softmax(teacher, -1).topk(8, dim=-1)
    assert 0 <= float(topk_kl(student, logp, ids)) <= float(full_kl(student, teacher)) + 1e-6


def test_teacher_cache_computes_once_and_reuses(tiny_model, tmp_path):
    model = tiny_model()
    batch = torch.randint(0, 300, (2, 16))
    teacher = Teacher(model, k=320, cache=tmp_path, identity="tiny")
    first = teacher.topk(batch)
    again = Teacher(model, k=320, cache=tmp_path, identity="tiny").topk(batch)
    assert teacher.computed == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    student = torch.randn(2, 16, 320)
    with torch.no_grad():
        torch.testing.assert_close(topk_kl(student, *first), full_kl(student, model(batch).logits))


def paper_reference(run, config: TrainConfig):
    """METHOD.md section 5 restated independently: AdamW on adapters and slot norms, CE, cosine, clip 1."""
    ckpt = load_checkpoint(run)
    model, plan = ckpt.model, ckpt.plan
    for p in model.parameters():
        p.requires_grad_(False)
    train = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        pos = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if name.endswith(("lora_A", "lora_B")) or (pos is not None and plan.layers[pos].is_slot and "norm" in name):
            train[name] = p.requires_grad_(True)
    optimizer = torch.optim.AdamW([dict(params=[p for p in train.values() if p.dim() >= 2], weight_decay=0.0),
                                   dict(params=[p for p in train.values() if p.dim() < 2], weight_decay=0.0)],
                                  lr=config.lr, foreach=False)
    total = config.total_steps()
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    windows = token_windows(tokenize_texts(ckpt.tokenizer, config.data), config.seq_len)
    data = windows[:-max(1, round(len(windows) * config.eval_fraction))]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 100_003))
    model.train()
    losses = []
    for step in range(total):
        batch = data[order[step * config.batch_size:(step + 1) * config.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(train.values()), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return {k: v.detach() for k, v in train.items()}, losses


def test_recipe_paper_reproduces_the_published_recipe(tiny_run, tiny_text_file, tmp_path):
    run = tiny_run()
    config = config_from(None, recipe="paper", tokens=32 * 2 * 4, data=(str(tiny_text_file),), seq_len=32,
                         batch_size=2, eval_every=0, eval_sequences=2, save_every=0)
    assert (config.warm_start_tokens, config.distill, config.norm_lr_scale) == (0, 0.0, 1.0)
    out = recover(run, tmp_path / "rec", config, progress=False)
    ref, ref_losses = paper_reference(run, config)
    trained = load_file(out / "model.safetensors")
    for name, tensor in ref.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in read_log(out)] == pytest.approx(ref_losses, rel=1e-5)


def test_default_recipe_warm_starts_and_distils(tiny_run, tiny_text_file, tmp_path):
    config = TrainConfig(tokens=32 * 2 * 2, data=(str(tiny_text_file),), seq_len=32, batch_size=2, eval_every=0,
                         eval_sequences=2, save_every=0, warm_start_data=(str(tiny_text_file),),
                         warm_start_tokens=256, teacher_cache=str(tmp_path / "teacher"))
    assert config.recipe == "slots_kept" and config.distill > 0 and config.kept_share == 0.5
    run = tiny_run()
    out = recover(run, tmp_path / "rec", config, stop_after=0, progress=False)  # the warm start only
    warm = load_checkpoint(out).metadata["provenance"]["recovery"]["warm_start"]
    assert all(s["error_gamma"] < s["error_svd_init"] for s in warm["slots"].values())
    recover(run, out, config, resume=True, progress=False)
    assert len(list((tmp_path / "teacher").glob("*.pt"))) == 2  # one teacher file per training batch


def test_activation_aware_adapter_is_the_optimal_rank_r_fit_on_the_inputs():
    """|| (delta - B A) X^T ||_F reaches the Eckart-Young bound of delta L (C = X^T X = L L^T), below plain SVD."""
    from flexiedge.lowrank import adapter_init
    from flexiedge.warmstart import activation_aware_adapter

    torch.manual_seed(0)
    delta = torch.randn(24, 16)
    x = torch.randn(200, 16) * torch.logspace(0, 2, 16)  # anisotropic inputs, as in LLM activations
    lora_A, lora_B = activation_aware_adapter(delta, x.T @ x, rank=4, damp=0.0)
    err = torch.linalg.norm((delta - lora_B @ lora_A) @ x.T)
    s = torch.linalg.svdvals(delta.double() @ torch.linalg.cholesky((x.T @ x).double()))
    assert float(err) == pytest.approx(float(s[4:].pow(2).sum().sqrt()), rel=1e-4)
    plain_A, plain_B = adapter_init(delta, torch.zeros_like(delta), 4)
    assert err < torch.linalg.norm((delta - plain_B @ plain_A) @ x.T)


def test_recipe_slots_kept_moves_half_the_slot_rank_to_kept_blocks(tiny_run, tiny_text_file, tmp_path):
    """Slots keep the leading half of their SVD adapters (= a rank-r/2 prune); the freed parameters become
    LoRA on the kept blocks, so the trainable count matches the slots-only recipe's."""
    common = dict(tokens=32 * 2, data=(str(tiny_text_file),), seq_len=32, batch_size=2, eval_every=0,
                  eval_sequences=2, save_every=0, warm_start_tokens=0, distill=0.0)
    out = recover(tiny_run(rank=4), tmp_path / "sk", config_from(None, recipe="slots_kept", **common),
                  stop_after=0, progress=False)
    ckpt = load_checkpoint(out)
    half = load_checkpoint(tiny_run(rank=2, selection_rank=4, name="r2"))  # same bases as the rank-4 run
    for p in ckpt.plan.slots:
        assert ckpt.plan.layers[p].rank == 2
        for name in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(ckpt.model.model.layers[p].self_attn.q_proj, name),
                                       getattr(half.model.model.layers[p].self_attn.q_proj, name))
    kept = [spec for spec in ckpt.plan.layers if not spec.is_slot]
    assert all(spec.rank == 1 for spec in kept)  # 2 slots x 2 freed ranks over 4 kept blocks
    slots_only = recover(tiny_run(rank=4, name="r4"), tmp_path / "so", config_from(None, recipe="flexiedge", **common),
                         stop_after=0, progress=False)
    trainable = [load_checkpoint(o).metadata["provenance"]["recovery"]["trainable_parameters"] for o in (out, slots_only)]
    assert trainable[0] == trainable[1]


def test_kept_share_with_an_explicit_kept_lora_is_one_clear_error():
    from flexiedge.errors import FlexiEdgeError

    with pytest.raises(FlexiEdgeError, match="drop --kept-lora"):
        config_from(None, kept_share=0.5, kept_lora=7)


def test_an_explicit_kept_lora_replaces_the_recipes_kept_share():
    assert config_from(None, recipe="slots_kept", kept_lora=7).kept_share == 0
