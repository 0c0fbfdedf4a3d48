"""Safetensors read and written one tensor at a time, byte-compatible with the safetensors package."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexiedge.errors import FlexiEdgeError
from flexiedge.tensorfile import INDEX, SafetensorsWriter, TensorFiles, write_tensors
from flexiedge.models import file_sha256

TENSORS = {"f32": torch.randn(3, 5), "size1_odd_stride": torch.randn(1, 5).t(), "bf16": torch.randn(7).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
           "i64": torch.arange(4), "empty": torch.zeros(0, 3)}


def test_written_file_reads_back_with_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    sha = write_tensors(path, TENSORS, {"format": "pt"})
    loaded = load_file(path)
    assert sha == file_sha256(path)
    for name, tensor in TENSORS.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_reads_what_safetensors_wrote(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    with TensorFiles.open(tmp_path) as files:
        for name, tensor in TENSORS.items():
            assert files.get(name).dtype == tensor.dtype
            torch.testing.assert_close(files.get(name), tensor, rtol=0, atol=0)
        torch.testing.assert_close(files.get("bf16", torch.float32), TENSORS["bf16"].float())


def test_reads_an_hf_shard_set(tmp_path):
    save_file({"a": TENSORS["f32"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": TENSORS["i64"]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                             "b": "model-00002-of-00002.safetensors"}}))
    with TensorFiles.open(tmp_path) as files:
        assert sorted(files.names) == ["a", "b"]
        torch.testing.assert_close(files.get("b"), TENSORS["i64"])


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-8]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b"\xff" * 16), "not a safetensors file"),
])
def test_damaged_file_gives_one_clear_error(tmp_path, damage, message):
    path = tmp_path / "model.safetensors"
    write_tensors(path, TENSORS)
    damage(path)
    with pytest.raises(FlexiEdgeError, match=message):
        TensorFiles.open(path)


def test_missing_tensor_is_named(tmp_path):
    write_tensors(tmp_path / "model.safetensors", TENSORS)
    with TensorFiles.open(tmp_path) as files, pytest.raises(FlexiEdgeError, match="lm_head.weight is not in"):
        files.get("lm_head.weight")


def test_writer_refuses_tensors_out_of_the_declared_order(tmp_path):
    writer = SafetensorsWriter(tmp_path / "t.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(ValueError, match="expected"):
        writer.write("b", torch.zeros(2))
