"""Cost of the pipeline as the model grows: 0.1B, 1B and LLaMA-2-7B shapes, random weights, this machine.

    python benchmarks/scale.py [--sizes 0.1b 1b 7b] [--work /path/with/60GB]

Each stage runs as its own process (`flexiedge prune --stream`, `flexiedge export ...`); its wall
time and peak RSS come from the OS (wait4's ru_maxrss), and prune's three stages (score, select+init,
save) from the per-stage high-water marks it records in flexiedge.json (resetting the high-water mark
also resets the process's ru_maxrss, so prune's process-level figure is its time only). The 7B Q4_K GGUF is then
loaded in the patched llama.cpp runtime and generates; it and the ONNX int4 export are kept for
`benchmarks/devices.py --llama7b`. Weights are random (benchmarks/make_random_llama.py):
quality numbers would be meaningless and are not reported. The other exports are deleted after
measuring (a 7B run needs ~45 GB of disk on the way).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.append(str(HERE))

from common import markdown_table, write_result  # noqa: E402
from make_random_llama import SHAPES, write_model  # noqa: E402

GB = 1e9
EXPORTS = {  # stage -> (format, flexiedge export options)
    "export_gguf_f16": ("gguf", ["--type", "f16"]),
    "export_gguf_q4k": ("gguf", ["--type", "q4_k"]),
    "export_onnx_fp16": ("onnx", ["--precision", "fp16", "--stream"]),
    "export_onnx_int4": ("onnx", ["--precision", "int4", "--stream"]),
}
KEEP = {"export_gguf_q4k", "export_onnx_int4"}  # profiled by benchmarks/devices.py --llama7b


def measured(cmd: list[str], env: dict) -> dict:
    """Run `cmd`; its wall time and peak RSS (this child's own ru_maxrss, via wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}\n{output[-3000:]}")
    return dict(seconds=round(seconds, 2), peak_rss_gb=round(usage.ru_maxrss * 1024 / GB, 3))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def source_parameters(model: Path) -> int:
    from flexiedge.tensorfile import TensorFiles
    with TensorFiles.open(model) as files:
        return sum(info.numel for info in files.tensors.values())


def run_size(size: str, work: Path, args, env: dict, row: dict, save, exports: dict) -> dict:
    """Every stage of one size; `row` holds stages measured by an earlier, interrupted run (resumed)."""
    model, run = work / f"llama-{size}", work / f"run-{size}-30"
    if "prune_process" not in row or not (run / "flexiedge.json").is_file():
        if not (model / "config.json").is_file():
            write_model(size, model)
        row.update(size=size, params=source_parameters(model))
        prune = ["flexiedge", "prune", str(model), "--out", str(run), "--ratio", "0.3", "--stream", "--force",
                 "--svd", "randomized", "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len)]
        row["prune_process"] = dict(seconds=measured(prune, env)["seconds"])
        stages = json.loads((run / "flexiedge.json").read_text())["provenance"]["stages"]
        row.update({s["stage"]: dict(seconds=s["seconds"], peak_rss_gb=s["peak_rss_gb"]) for s in stages})
        row["checkpoint_bytes"] = folder_bytes(run)
        save()
    for stage, (fmt, options) in exports.items():
        if stage in row:
            continue
        out = work / f"{size}-{stage}"
        row[stage] = measured(["flexiedge", "export", fmt, str(run), "--out", str(out), "--no-verify", "--force",
                               *options], env)
        row[stage]["bytes"] = folder_bytes(out)
        if stage not in KEEP:
            shutil.rmtree(out)
        save()
    return row


def generate_q4k(folder: Path, threads: int) -> dict:
    """Load model.gguf + adapters.gguf in the patched runtime and generate greedily."""
    from flexiedge.runtimes.llamacpp import LlamaCppModel

    start = time.perf_counter()
    with LlamaCppModel.load(folder / "model.gguf", folder / "adapters.gguf", n_threads=threads, n_ctx=256) as m:
        loaded = time.perf_counter() - start
        prompt = m.tokenize("Alice was beginning to get very tired of sitting by her sister")
        start = time.perf_counter()
        out = m.generate(prompt, max_new_tokens=16, stop_at_eos=False)
        seconds = time.perf_counter() - start
        size = m.size_bytes
    return dict(load_seconds=round(loaded, 2), model_bytes_in_runtime=size, new_tokens=len(out.token_ids),
                generate_seconds=round(seconds, 2), tokens=[int(t) for t in out.token_ids])


def randomized_choice_check(ratio_blocks=(9, 12), rank: int = 32) -> dict:
    """Does the randomized SVD (used for every matrix above 2048 rows/columns) pick the exact SVD's bases?
    Checked on SmolLM2-135M's real weights, where distances carry information (random weights do not)."""
    from flexiedge.models import load_model
    from flexiedge.plan import block_distances, choose_bases, select_pruned_blocks
    from flexiedge.prune import CalibrationConfig, score_blocks

    model, tokenizer = load_model("smollm2-135m")
    scores, _ = score_blocks(model, tokenizer, CalibrationConfig(tokens=1024, seq_len=256))
    out = {}
    for n in ratio_blocks:
        pruned = select_pruned_blocks(scores, n)
        kept = [b for b in range(len(scores)) if b not in pruned]
        dist = {svd: block_distances(model.model.layers, pruned, kept, rank, "lowrank", svd)
                for svd in ("exact", "randomized")}
        bases = {svd: choose_bases(d) for svd, d in dist.items()}
        differ = [i for i in pruned if bases["exact"][i] != bases["randomized"][i]]
        gaps = [abs(dist["exact"][i][bases["exact"][i]] - dist["exact"][i][bases["randomized"][i]])
                / dist["exact"][i][bases["exact"][i]] for i in differ]
        out[f"{n}_blocks"] = dict(slots=n, same_base=n - len(differ), differing=differ,
                                  exact_distance_gap_of_differing=[round(g, 5) for g in gaps])
    return out


def growth_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x: y ~ x^k."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


STAGES = ["score", "select_init", "save", *EXPORTS]


def summarise(rows: list[dict], generated: dict | None) -> dict:
    by = {r["size"]: r for r in rows}
    params = [r["params"] for r in rows]
    total_time = [sum(r[s]["seconds"] for s in STAGES) for r in rows]
    max_rss = [max(r[s]["peak_rss_gb"] for s in STAGES) for r in rows]
    summary = {}
    if "7b" in by:
        r = by["7b"]
        summary.update(peak_rss_gb_7b_max_stage=max(r[s]["peak_rss_gb"] for s in STAGES),
                       seconds_7b_score=r["score"]["seconds"], seconds_7b_select_init=r["select_init"]["seconds"],
                       seconds_7b_export_gguf_q4k=r["export_gguf_q4k"]["seconds"],
                       seconds_7b_export_onnx_int4=r["export_onnx_int4"]["seconds"])
    if len(rows) > 1:
        summary.update(time_growth_exponent=round(growth_exponent(params, total_time), 3),
                       memory_growth_exponent=round(growth_exponent(params, max_rss), 3))
    if "7b" in by:
        summary.update(gguf_q4k_7b_30_bytes=by["7b"]["export_gguf_q4k"]["bytes"],
                       onnx_int4_7b_30_bytes=by["7b"]["export_onnx_int4"]["bytes"],
                       peak_rss_under_16gb_7b=summary["peak_rss_gb_7b_max_stage"] < 16,
                       gguf_q4k_7b_generates=bool(generated and generated["new_tokens"] > 0))
    return summary


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        for s in STAGES:
            out.append(dict(size=r["size"], params=f"{r['params'] / 1e9:.2f}B", stage=s, seconds=r[s]["seconds"],
                            peak_rss_gb=r[s]["peak_rss_gb"], bytes=r[s].get("bytes", "")))
    return markdown_table(out, ["size", "params", "stage", "seconds", "peak_rss_gb", "bytes"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--work", type=Path, default=Path("/work/scale"), help="models and runs (~60 GB free for 7b)")
    p.add_argument("--calib-tokens", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--exports", nargs="+", default=list(EXPORTS), choices=list(EXPORTS),
                   help="measure only these exports now (resume later)")
    p.add_argument("--only-prune", action="store_true", help="measure the prune stages only (resume later)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    partial = HERE / "results" / "scale.partial.json"
    done = json.loads(partial.read_text()) if partial.exists() else {}
    def save():
        partial.write_text(json.dumps(done, indent=2))

    done.setdefault("invocations", []).append(" ".join(["python", *sys.argv]))  # a resumed run has several

    for size in args.sizes:
        exports = {} if args.only_prune else {k: v for k, v in EXPORTS.items() if k in args.exports}
        run_size(size, args.work, args, env, done.setdefault(size, {}), save, exports)
        print(json.dumps(done[size]), file=sys.stderr)
    if args.only_prune or set(args.exports) != set(EXPORTS):
        return  # a partial measurement: resume without these options to finish and summarise
    if "randomized_check" not in done:
        done["randomized_check"] = randomized_choice_check()
        save()
    rows = [done[s] for s in args.sizes]
    generated = None
    if "7b" in args.sizes:
        generated = generate_q4k(args.work / "7b-export_gguf_q4k", args.threads)
        print(f"7b q4_k generated {generated}", file=sys.stderr)
    summary = summarise(rows, generated)
    checks = done["randomized_check"].values()
    summary["randomized_svd_same_base_fraction_smollm2"] = round(
        sum(c["same_base"] for c in checks) / sum(c["slots"] for c in checks), 3)
    settings = dict(sizes=args.sizes, shapes={s: SHAPES[s] for s in args.sizes}, ratio=0.3, rank=32,
                    svd="randomized", calib_tokens=args.calib_tokens, seq_len=args.seq_len, threads=args.threads,
                    load_average=os.getloadavg(), weights="random N(0, 0.02), bf16 shards",
                    invocations=done["invocations"])
    print(json.dumps(summary, indent=2))
    per_stage = {s: dict(time=round(growth_exponent([r["params"] for r in rows], [r[s]["seconds"] for r in rows]), 3),
                         memory=round(growth_exponent([r["params"] for r in rows], [r[s]["peak_rss_gb"] for r in rows]), 3))
                 for s in STAGES} if len(rows) > 1 else {}
    write_result("scale", summary, settings, dict(rows=rows, generate_7b_q4k=generated, growth_exponent_per_stage=per_stage,
                                                  randomized_svd_check=done["randomized_check"]), table(rows))


if __name__ == "__main__":
    main()
