"""Tiny runs exported to ONNX once per test session (tracing is the slow step: one trace, four precisions).

tests/runtimes/test_onnxruntime.py imports these fixtures too; results are kept on the pytest config
object, so one session traces once, whichever files it runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _root_conftest():
    """tests/conftest.py's factories; `import conftest` here would find this file instead."""
    spec = importlib.util.spec_from_file_location("flexiedge_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _session_cache(request) -> dict:
    if not hasattr(request.config, "_flexiedge_onnx_cache"):
        request.config._flexiedge_onnx_cache = {}
    return request.config._flexiedge_onnx_cache


def _make_run(root: Path, tokenizer, text_file) -> Path:
    from flexiedge.plan import PruneConfig
    from flexiedge.prune import CalibrationConfig, prune

    model_dir = root / "tiny-llama"
    _root_conftest().make_tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calibration = CalibrationConfig(texts=(str(text_file),), tokens=256, seq_len=64)
    return prune(str(model_dir), root / "run", PruneConfig(blocks=2, rank=4), calibration)


@pytest.fixture(scope="session")
def tiny_flexigpt_run(request, tmp_path_factory, tiny_tokenizer, tiny_text_file):
    """A FlexiGPT run of the tiny GQA llama: 6 blocks, 2 slots of rank 4 sharing base blocks."""
    cache = _session_cache(request)
    if "run" not in cache:
        cache["run"] = _make_run(tmp_path_factory.mktemp("onnx-runs"), tiny_tokenizer, tiny_text_file)
    return cache["run"]


@pytest.fixture(scope="session")
def tiny_checkpoint(request, tiny_flexigpt_run):
    from flexiedge.checkpoint import load_checkpoint
    cache = _session_cache(request)
    if "checkpoint" not in cache:
        cache["checkpoint"] = load_checkpoint(tiny_flexigpt_run)
    return cache["checkpoint"]


@pytest.fixture(scope="session")
def tiny_export(request, tmp_path_factory, tiny_checkpoint):
    """Factory: tiny_export('fp32'|'fp16'|'int8'|'int4') -> (folder, report), traced once, written once."""
    from flexiedge.exporters.onnx import OnnxExportConfig, trace_checkpoint, write_export

    cache = _session_cache(request)

    def make(precision: str = "fp32"):
        if "traced" not in cache:
            cache["traced"] = trace_checkpoint(tiny_checkpoint)
            cache["exports"] = tmp_path_factory.mktemp("onnx-exports")
        if precision not in cache:
            out = cache["exports"] / precision
            cache[precision] = out, write_export(tiny_checkpoint, cache["traced"], out,
                                                 OnnxExportConfig(precision=precision))
        return cache[precision]
    return make
