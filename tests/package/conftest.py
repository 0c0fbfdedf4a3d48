"""Tiny runs and bundles for the packaging tests, made once per session (exports are the slow step)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _root_conftest():
    """tests/conftest.py's factories; `import conftest` here would find this file instead."""
    spec = importlib.util.spec_from_file_location("flexiedge_tests_conftest_pkg", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory, tiny_tokenizer):
    """A tiny llama HF folder (6 blocks, GQA) with a model card naming its licence."""
    folder = tmp_path_factory.mktemp("pkg-src") / "tiny-llama"
    _root_conftest().make_tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [tiny]\n---\n# tiny\n")
    return folder


@pytest.fixture(scope="session")
def tiny_pkg_run(tmp_path_factory, tiny_source, tiny_text_file):
    """A FlexiGPT run of the tiny model: 2 slots of rank 4."""
    from flexiedge.plan import PruneConfig
    from flexiedge.prune import CalibrationConfig, prune

    calibration = CalibrationConfig(texts=(str(tiny_text_file),), tokens=256, seq_len=64)
    return prune(str(tiny_source), tmp_path_factory.mktemp("pkg-run") / "run", PruneConfig(blocks=2, rank=4), calibration)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_pkg_run):
    """Factory: tiny_bundle('gguf'|'onnx', archive=None|'zip'|'tar') -> bundle folder (and archive), made once."""
    from flexiedge.package import PackageConfig, package

    made = {}
    root = tmp_path_factory.mktemp("pkg-bundles")

    def make(target: str = "gguf", archive: str | None = None):
        if target not in made:
            made[target] = package(tiny_pkg_run, root / target, PackageConfig(target=target, archive="zip"))
            from flexiedge.bundle_files import write_archive
            write_archive(root / target, root / f"{target}.tar", "tar")
        result = made[target]
        return result.bundle if archive is None else result.bundle.with_name(f"{target}.{archive}")
    return make
