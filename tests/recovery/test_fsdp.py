"""The many-process path: accelerate launch + FSDP2 units from the plan, 2 CPU processes over gloo."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flexiedge
from flexiedge.checkpoint import load_checkpoint, read_metadata
from flexiedge.distributed import share_groups
from flexiedge.plan import LayerSpec, Plan
from flexiedge.recover import recover
from flexiedge.train_config import TrainConfig

FSDP_CONFIG = Path(flexiedge.__file__).parent / "configs" / "fsdp.yaml"


def plan_of(shares: list[int | None]) -> Plan:
    return Plan("flexigpt", len(shares), [LayerSpec(i, s, 4 if s is not None else 0) for i, s in enumerate(shares)])


@pytest.mark.parametrize("shares, groups", [
    ([None, None, None], [[0], [1], [2]]),                    # no slots: one unit per block
    ([None, 0, 0, None], [[0, 1, 2], [3]]),                   # two slots reuse block 0: one unit of three
    ([None, None, None, 2, 0, None], [[0, 4], [1], [2, 3], [5]]),  # the tiny run's map, slot before/after base
    ([None, 2, None], [[0], [2, 1]]),                         # a slot whose base comes after it: base first
])
def test_share_groups_put_each_base_with_its_slots(shares, groups):
    assert sorted(share_groups(plan_of(shares))) == sorted(groups)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tiny_run, tiny_text_file, tmp_path):
    """2 processes x batch 2 see the same samples per step as 1 process x batch 4: same weights."""
    run = tiny_run()
    common = ["--tokens", "512", "--data", str(tiny_text_file), "--seq-len", "32", "--eval-every", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "flexiedge", "recover", str(run), "--out", str(tmp_path / "fsdp"), "--batch-size", "2", *common]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_metadata(tmp_path / "fsdp")["provenance"]["recovery"]["world_size"] == 2
    single = recover(run, tmp_path / "single", TrainConfig(tokens=512, data=(str(tiny_text_file),), seq_len=32,
                                                           batch_size=4, eval_every=2), progress=False)
    a, b = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(single / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    ckpt = load_checkpoint(tmp_path / "fsdp")  # reloads with sharing re-tied
    layers = ckpt.model.model.layers
    for p in ckpt.plan.slots:
        assert layers[p].self_attn.q_proj.weight is layers[ckpt.plan.layers[p].shares].self_attn.q_proj.weight
