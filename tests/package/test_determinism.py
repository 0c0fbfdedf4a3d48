"""Exports are deterministic: the same run and settings give byte-identical model files (GGUF and ONNX)."""

from __future__ import annotations

from flexiedge import bundle_targets as bt
from flexiedge.package import PackageConfig, package, verify_bundle
from flexiedge.pipeline import export_hashes


def test_gguf_export_is_byte_identical_twice(tiny_pkg_run, tmp_path):
    for type_ in ("f16", "q8_0"):
        hashes = []
        for i in range(2):
            bt.export("gguf", tiny_pkg_run, tmp_path / f"{type_}-{i}", bt.ExportSettings(gguf_type=type_, verify=False))
            hashes.append(export_hashes("gguf", tmp_path / f"{type_}-{i}"))
        assert hashes[0] == hashes[1] and set(hashes[0]) == {"model.gguf", "adapters.gguf"}


def test_onnx_export_is_byte_identical_twice_and_its_bundle_verifies(tiny_pkg_run, tmp_path):
    hashes = []
    for i in range(2):  # two full exports (trace included): the slow test of this folder (~1 min)
        bt.export("onnx", tiny_pkg_run, tmp_path / f"onnx-{i}", bt.ExportSettings())
        hashes.append(export_hashes("onnx", tmp_path / f"onnx-{i}"))
    assert hashes[0] == hashes[1] and set(hashes[0]) == {"model.onnx", "model.onnx.data", "genai_config.json"}
    result = package(tiny_pkg_run, tmp_path / "bundle", PackageConfig(target="onnx", archive="tar"),
                     export_dir=tmp_path / "onnx-0")
    assert result.manifest["runtime"]["config_file"] == "genai_config.json"
    assert verify_bundle(result.archive, max_new_tokens=4).files == len(result.manifest["files"])
