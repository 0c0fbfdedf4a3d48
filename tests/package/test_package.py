"""`flexiedge package`: bundle contents, manifest facts, model card, deterministic archives, `flexiedge run`."""

from __future__ import annotations

import json

from flexiedge.bundle_files import write_archive
from flexiedge.cli import main


def test_gguf_bundle_holds_model_adapters_tokenizer_params_manifest_and_card(tiny_bundle, tiny_pkg_run):
    bundle = tiny_bundle("gguf")
    names = {p.name for p in bundle.iterdir()}
    assert {"model.gguf", "adapters.gguf", "llama_params.json", "tokenizer.json", "manifest.json", "README.md"} <= names
    params = json.loads((bundle / "llama_params.json").read_text())
    assert params["use_mmap"] and params["adapters"] == "adapters.gguf" and params["n_ctx"] == 256  # model's limit
    m = json.loads((bundle / "manifest.json").read_text())
    meta = json.loads((tiny_pkg_run / "flexiedge.json").read_text())
    assert m["format"] == "flexiedge-bundle" and m["target"] == "gguf"
    assert m["licence"] == "apache-2.0"                       # read from the source's model card
    assert m["slot_map"] == {str(p): l["shares"] for p, l in enumerate(meta["plan"]["layers"]) if l["shares"] is not None}
    assert m["unique_parameters"] == meta["parameters"]["stored"]  # GGUF stores every unique parameter once
    assert m["source"]["sha256"] and m["run"]["weights_sha256"] == meta["weights"]["sha256"]
    listed = {f["path"]: f for f in m["files"]}
    assert set(listed) == names - {"manifest.json"}
    assert listed["model.gguf"]["bytes"] == (bundle / "model.gguf").stat().st_size
    card = (bundle / "README.md").read_text()
    assert "apache-2.0" in card and "Measured figures" in card


def test_archives_are_byte_identical_when_written_twice(tiny_bundle, tmp_path):
    for kind in ("zip", "tar"):
        a = write_archive(tiny_bundle("gguf"), tmp_path / f"a.{kind}", kind)
        b = write_archive(tiny_bundle("gguf"), tmp_path / f"b.{kind}", kind)
        assert a.read_bytes() == b.read_bytes()


def test_run_streams_a_generation_from_an_archive(tiny_bundle, capsys):
    assert main(["run", str(tiny_bundle("gguf", "zip")), "Alice was", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_device_profile_and_estimate_go_into_the_manifest(tiny_pkg_run, tmp_path):
    from flexiedge.package import PackageConfig, package
    result = package(tiny_pkg_run, tmp_path / "b", PackageConfig(target="gguf", device="phone-snapdragon-8gen3"))
    device = result.manifest["device"]
    assert device["name"] == "phone-snapdragon-8gen3" and device["profile"]["bandwidth_gbps"] > 0
    assert device["estimate"]["decode_tps"] > 0
    params = json.loads((result.bundle / "llama_params.json").read_text())
    assert params["n_threads"] == device["threads"]


def test_unknown_device_fails_before_exporting_and_names_the_known_profiles(tiny_pkg_run, tmp_path, capsys):
    assert main(["package", str(tiny_pkg_run), "--target", "gguf", "--device", "nokia", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown device profile 'nokia'" in err and "rpi5" in err and not (tmp_path / "b").exists()
