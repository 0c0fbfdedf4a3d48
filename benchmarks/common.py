"""Shared by the benchmark scripts: provenance and the results file (benchmarks/results/NAME.json)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu or platform.processor(), cores=os.cpu_count(), system=platform.platform(),
                python=platform.python_version())


def versions() -> dict:
    import torch
    import transformers
    import flexiedge
    found = dict(flexiedge=flexiedge.__version__, torch=torch.__version__, transformers=transformers.__version__)
    for name in ("onnxruntime", "onnx", "gguf", "llama_cpp", "accelerate"):
        try:
            found[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    try:
        found["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True, cwd=RESULTS.parent).stdout.strip()
    except OSError:
        pass
    return found


def write_result(name: str, summary: dict, settings: dict, details: dict, table: str | None = None) -> Path:
    """Write results/NAME.json (summary first: flat name -> value) and, if given, results/NAME.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = dict(summary=summary, command=" ".join([Path(sys.executable).name] + sys.argv), settings=settings,
               versions=versions(), machine=machine(), date=time.strftime("%Y-%m-%d %H:%M:%S"), details=details)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    if table:
        (RESULTS / f"{name}.md").write_text(table + "\n")
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
