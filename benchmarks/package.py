"""Bundle size, verify time and export determinism for a real run.

    python benchmarks/package.py                               # runs/smollm2-30, GGUF and ONNX
    python benchmarks/package.py --run RUN --targets gguf --archive zip

For each target: export the run twice into fresh folders and compare every model file byte for byte
(deterministic_export is true only if all of them match), package the first export (+ archive), then
`verify` the archive (hashes, load in the runtime, 8 generated tokens) and time it.
Writes benchmarks/results/package.json (summary: bundle_bytes, verify_seconds, deterministic_export).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Python puts this folder first on sys.path, where benchmarks/gguf.py would shadow the gguf package: move it last.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from common import markdown_table, write_result  # noqa: E402

from flexiedge import bundle_targets as bt  # noqa: E402
from flexiedge.package import PackageConfig, package, verify_bundle  # noqa: E402
from flexiedge.pipeline import export_hashes  # noqa: E402


def measure(run: Path, target: str, work: Path, archive: str) -> dict:
    settings = bt.ExportSettings()
    timings, hashes = [], []
    for i in range(2):
        t0 = time.perf_counter()
        bt.export(target, run, work / f"{target}-{i}", settings)
        timings.append(time.perf_counter() - t0)
        hashes.append(export_hashes(target, work / f"{target}-{i}"))
    differing = sorted(n for n in hashes[0] if hashes[0][n] != hashes[1].get(n))
    result = package(run, work / f"bundle-{target}", PackageConfig(target=target, archive=archive),
                     export_dir=work / f"{target}-0")
    check = verify_bundle(result.archive)
    return dict(target=target, bundle_bytes=sum(f["bytes"] for f in result.manifest["files"]),
                archive_bytes=result.archive.stat().st_size, verify_seconds=check.seconds,
                verify_hash_seconds=check.hash_seconds, verify_load_seconds=check.load_seconds,
                deterministic=not differing, differing_files=differing, export_seconds=timings,
                model_sha256=hashes[0], generated=check.generated, files=len(result.manifest["files"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/smollm2-30")
    ap.add_argument("--targets", default="gguf,onnx")
    ap.add_argument("--archive", default="zip", choices=("zip", "tar"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-package-", dir=Path(args.run).parent) as tmp:
        for target in args.targets.split(","):
            rows.append(measure(Path(args.run), target, Path(tmp), args.archive))
            print(rows[-1], flush=True)
    summary = dict(bundle_bytes=sum(r["bundle_bytes"] for r in rows),
                   verify_seconds=sum(r["verify_seconds"] for r in rows),
                   deterministic_export=all(r["deterministic"] for r in rows),
                   **{f"{r['target']}_{k}": r[k] for r in rows
                      for k in ("bundle_bytes", "verify_seconds", "deterministic")})
    table = markdown_table(rows, ["target", "bundle_bytes", "archive_bytes", "verify_seconds", "deterministic"])
    path = write_result("package", summary, vars(args), dict(targets=rows), table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
