"""The pipeline on a tiny model: a rerun skips every finished stage; a new ratio keeps the Block Influence
scores (keyed by calibration settings only) and reruns prune and every stage after it; new calibration
settings rerun from score on; an interrupted stage resumes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from flexiedge.pipeline import EvalSettings, PipelineConfig, ProfileSettings, run_pipeline
from flexiedge.plan import PruneConfig
from flexiedge.prune import CalibrationConfig
from flexiedge.train_config import TrainConfig

AFTER_RECOVER = ["export-gguf", "verify-gguf", "profile-gguf", "package-gguf"]


@pytest.fixture
def tiny_pipeline(tiny_source, tiny_text_file, tmp_path):
    def make(recover_tokens: int = 0, **changes):
        text = (str(tiny_text_file),)
        train = (TrainConfig(tokens=recover_tokens, data=text, seq_len=32, batch_size=2, recipe="paper", eval_sequences=1)
                 if recover_tokens else TrainConfig(tokens=0))
        config = PipelineConfig(model=str(tiny_source), prune=PruneConfig(blocks=2, rank=4),
                                calibration=CalibrationConfig(texts=text, tokens=256, seq_len=64), train=train,
                                targets=("gguf",), archive="zip",
                                eval=EvalSettings(texts=text, tokens=64, context=32, generate_tokens=4),
                                profile=ProfileSettings(prompt_tokens=8, gen_tokens=4, threads=1))
        return replace(config, **changes)
    return make


def _statuses(summary: dict) -> dict:
    return {s["stage"]: s["status"] for s in summary["stages"]}


def test_rerun_skips_every_stage_and_a_new_ratio_reruns_from_prune_on(tiny_pipeline, tmp_path):
    out = tmp_path / "pipe"
    first = run_pipeline(tiny_pipeline(), out, log=lambda s: None)
    assert set(_statuses(first).values()) == {"ran"}
    assert first["bundles"][0]["verified"] and (out / "bundles" / "gguf.zip").is_file()

    again = run_pipeline(tiny_pipeline(), out, log=lambda s: None)
    assert set(_statuses(again).values()) == {"skipped"}
    assert again["bundles"] == first["bundles"]

    ratio = run_pipeline(tiny_pipeline(prune=PruneConfig(blocks=1, rank=4)), out, log=lambda s: None)
    assert _statuses(ratio) == dict(load="skipped", score="skipped", prune="ran", recover="ran",
                                    **{s: "ran" for s in AFTER_RECOVER})
    plan = json.loads((out / "pruned" / "flexiedge.json").read_text())["plan"]
    assert len(plan["pruned"]) == 1

    fewer = CalibrationConfig(texts=tiny_pipeline().calibration.texts, tokens=128, seq_len=64)
    calib = run_pipeline(tiny_pipeline(prune=PruneConfig(blocks=1, rank=4), calibration=fewer), out, log=lambda s: None)
    assert _statuses(calib)["load"] == "skipped" and _statuses(calib)["score"] == "ran"


def test_recovery_stage_trains_and_an_interrupted_stage_resumes(tiny_pipeline, tmp_path):
    out = tmp_path / "pipe"
    config = tiny_pipeline(recover_tokens=128, targets=("gguf",))
    first = run_pipeline(config, out, log=lambda s: None)
    assert _statuses(first)["recover"] == "ran"
    assert json.loads((out / "recovered" / "flexiedge.json").read_text())["provenance"]["recovery"]
    record = out / "stages" / "package-gguf.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps(dict(data, status="started")))  # as if killed while packaging
    again = run_pipeline(config, out, log=lambda s: None)
    assert _statuses(again)["package-gguf"] == "resumed"
    assert [s for s, v in _statuses(again).items() if v != "skipped"] == ["package-gguf"]


def test_summary_table_is_printed(tiny_pipeline, tmp_path):
    lines = []
    run_pipeline(tiny_pipeline(), tmp_path / "pipe", log=lines.append)
    assert any(l.startswith("[1/8] load") for l in lines)
    table = "\n".join(lines)
    assert "held-out PPL" in table and "| gguf | - |" in table
