"""Resumable stages: each writes its artifact under the pipeline folder plus a record of what made it.

    DIR/stages/NAME.json   {stage, key, status, settings, inputs, artifact, result, seconds}

key = sha256 of the stage's settings and its inputs' fingerprints (each upstream artifact's own hash).
A stage whose record says "done" with the same key, and whose artifact still exists, is skipped; its
recorded result (including the fingerprint its consumers key on) is reused. A stage that was started
with the same key but did not finish is told to resume (recovery continues from its last checkpoint);
an artifact made under another key is removed before the stage reruns.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cache import atomic_file


def stage_key(settings: dict, inputs: dict) -> str:
    text = json.dumps(dict(settings=settings, inputs=inputs), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class StageRunner:
    """Runs stages in order under `root`, printing one progress line per stage."""
    root: Path
    total: int
    log: Callable[[str], None] = print
    done: list = field(default_factory=list)   # (name, status, seconds) in run order

    def record_path(self, name: str) -> Path:
        return self.root / "stages" / f"{name}.json"

    def read(self, name: str) -> dict | None:
        path = self.record_path(name)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            return None

    def run(self, name: str, settings: dict, inputs: dict, artifact: Path | None,
            fn: Callable[[Path | None, bool], dict]) -> dict:
        """fn(artifact, resume) -> result dict (with a "fingerprint"); returns the result, run or reused."""
        key, previous = stage_key(settings, inputs), self.read(name)
        prefix = f"[{len(self.done) + 1}/{self.total}] {name}"
        if previous and previous["key"] == key and previous["status"] == "done" and _exists(artifact):
            self.done.append((name, "skipped", 0.0))
            self.log(f"{prefix}: skipped (settings and inputs unchanged)")
            return previous["result"]
        resume = bool(previous and previous["key"] == key and previous["status"] == "started")
        if not resume:
            _remove(artifact)
        self.log(f"{prefix}: {'resuming' if resume else 'running'} ...")
        self._write(name, dict(stage=name, key=key, status="started", settings=settings, inputs=inputs,
                               artifact=self._rel(artifact)))
        t0 = time.perf_counter()
        result = fn(artifact, resume)
        seconds = time.perf_counter() - t0
        self._write(name, dict(stage=name, key=key, status="done", settings=settings, inputs=inputs,
                               artifact=self._rel(artifact), result=result, seconds=seconds))
        self.done.append((name, "resumed" if resume else "ran", seconds))
        self.log(f"{prefix}: done in {seconds:.1f} s")
        return result

    def _write(self, name: str, data: dict) -> None:
        with atomic_file(self.record_path(name)) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")

    def _rel(self, artifact: Path | None) -> str | None:
        return None if artifact is None else str(Path(artifact).relative_to(self.root))


def _exists(artifact: Path | None) -> bool:
    return artifact is None or Path(artifact).exists()


def _remove(artifact: Path | None) -> None:
    if artifact is None or not Path(artifact).exists():
        return
    if Path(artifact).is_dir():
        shutil.rmtree(artifact)
    else:
        Path(artifact).unlink()


def json_fingerprint(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
