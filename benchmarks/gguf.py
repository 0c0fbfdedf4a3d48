"""GGUF export benchmark: sizes per type and layout, llama.cpp parity against PyTorch, and speed / resident
memory of unpruned, ShortGPT and FlexiGPT SmolLM2-135M (30%) in the patched llama.cpp, side by side.

    flexiedge prune --out runs/smollm2-30                                         # FlexiGPT 30%
    flexiedge prune --method shortgpt --ratio 0.3 --out runs/smollm2-30-shortgpt  # ShortGPT 30%
    nice -n 5 python benchmarks/gguf.py          # -> benchmarks/results/gguf.json + gguf.md

Timings (pp128 / tg128, F16, 2 threads, FlexiGPT with its adapters on) interleave the three models within
each repeat and report medians; time ratios (> 1 = slower than unpruned) are what to read on this shared
machine. Peak RSS is measured in a fresh subprocess per model (mmap on), minus the same process's RSS
before loading.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the gguf package.
HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flexiedge.cache import cache_dir  # noqa: E402
from flexiedge.checkpoint import load_checkpoint, read_metadata  # noqa: E402
from flexiedge.data import EVAL_TEXTS, tokenize_texts  # noqa: E402
from flexiedge.errors import FlexiEdgeError  # noqa: E402
from flexiedge.exporters.gguf import ADAPTER_FILE, MODEL_FILE, GGUFExportConfig, export_gguf  # noqa: E402
from flexiedge.runtimes.llamacpp import LlamaCppModel  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_common", HERE / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

ROOT = HERE.parent
RUNS = dict(unpruned=Path.home() / ".cache/flexiedge/models/smollm2-135m", shortgpt=ROOT / "runs/smollm2-30-shortgpt",
            flexigpt=ROOT / "runs/smollm2-30", flexigpt_no_norm=ROOT / "runs/smollm2-30-no_output_norm")
TYPES = ("f32", "f16", "q8_0", "q4_k")

RSS_SCRIPT = """
import resource, sys
from flexiedge.runtimes.llamacpp.runtime import LlamaCppModel
def rss(): return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))) * 1024
before = rss()
m = LlamaCppModel.load(sys.argv[1], sys.argv[2] or None, n_threads=2, n_ctx=512)
m.time(prompt_tokens=128, gen_tokens=32)
print(before, rss(), m.size_bytes)
"""


def export_all(out: Path) -> dict:
    """(run, type, layout) -> export report; a refused export records its error."""
    reports = {}
    jobs = [(run, t, "compact") for run in ("unpruned", "shortgpt", "flexigpt") for t in TYPES]
    jobs += [("flexigpt", "f16", "stock"), ("flexigpt_no_norm", "f16", "compact"), ("flexigpt_no_norm", "f16", "stock"),
             ("flexigpt_no_norm", "q8_0", "stock")]
    for run, t, layout in jobs:
        folder = out / f"{run}-{t}-{layout}"
        print(f"export {run} {t} {layout}", file=sys.stderr, flush=True)
        try:
            if (folder / "flexiedge-export.json").is_file():
                reports[run, t, layout] = json.loads((folder / "flexiedge-export.json").read_text())
            else:  # parity is measured below on more positions; the export's own verify still runs
                reports[run, t, layout] = export_gguf(RUNS[run], folder, GGUFExportConfig(t, layout), overwrite=True)
            reports[run, t, layout]["folder"] = str(folder)
        except FlexiEdgeError as e:
            reports[run, t, layout] = dict(error=str(e))
    return reports


def files(report: dict) -> tuple[Path, Path | None]:
    folder = Path(report["folder"])
    adapters = folder / ADAPTER_FILE
    return folder / MODEL_FILE, adapters if adapters.is_file() else None


def parity(reports: dict, positions: int) -> dict:
    """FlexiGPT in llama.cpp (adapters on, f32 KV, no flash attention) vs the PyTorch checkpoint model."""
    ckpt = load_checkpoint(RUNS["flexigpt"])
    ids = tokenize_texts(ckpt.tokenizer, list(EVAL_TEXTS))[:positions].tolist()
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([ids])).logits[0].float().numpy()
    out = {}
    for t in TYPES:
        with LlamaCppModel.load(*files(reports["flexigpt", t, "compact"]), n_threads=2, n_ctx=positions,
                                kv_type="f32", flash_attn=False) as m:
            got = m.logits(ids)
        diff = np.abs(got - ref)
        out[t] = dict(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                      argmax_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()), positions=len(ids))
    return out


def timing(reports: dict, repeats: int, t: str = "f16") -> dict:
    models = {run: LlamaCppModel.load(*files(reports[run, t, "compact"]), n_threads=2, n_ctx=512)
              for run in ("unpruned", "shortgpt", "flexigpt")}
    runs = {run: [] for run in models}
    for run, m in models.items():  # warm-up: page in the mmapped weights
        m.time(prompt_tokens=32, gen_tokens=8)
    for rep in range(repeats):
        order = list(models) if rep % 2 == 0 else list(models)[::-1]
        for run in order:
            runs[run].append(models[run].time(prompt_tokens=128, gen_tokens=128))
    for m in models.values():
        m.close()
    out = {}
    for run, rs in runs.items():
        out[run] = dict(pp128_tps=statistics.median(r["prefill_tps"] for r in rs),
                        tg128_tps=statistics.median(r["decode_tps"] for r in rs))
    for run in out:  # per-repeat ratios (same repeat, same machine state), then the median
        out[run]["prefill_time_ratio"] = statistics.median(
            u["prefill_tps"] / r["prefill_tps"] for u, r in zip(runs["unpruned"], runs[run]))
        out[run]["decode_time_ratio"] = statistics.median(
            u["decode_tps"] / r["decode_tps"] for u, r in zip(runs["unpruned"], runs[run]))
    return out


def peak_rss(reports: dict, t: str = "f16") -> dict:
    out = {}
    for run in ("unpruned", "shortgpt", "flexigpt"):
        model, adapters = files(reports[run, t, "compact"])
        res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model), str(adapters or "")],
                             capture_output=True, text=True, check=True)
        before, peak, size = map(int, res.stdout.split()[-3:])
        out[run] = dict(peak_rss_bytes=peak, model_rss_bytes=peak - before, llama_model_size=size)
    return out


def size_rows(reports: dict, stored_ratio: dict) -> list[dict]:
    rows = []
    for (run, t, layout), r in reports.items():
        if "error" in r:
            rows.append(dict(run=run, type=t, layout=layout, note=r["error"].split(":")[0] + ": refused"))
            continue
        s = r["storage"]
        base = reports.get(("unpruned", t, "compact"), {}).get("storage")
        rows.append(dict(run=run, type=t, layout=layout, model_MiB=s["model_bytes"] / 2**20,
                         adapters_MiB=s["adapter_bytes"] / 2**20, data_over_unique=s["bytes_over_unique"],
                         file_over_unique=s["file_bytes_over_unique"],
                         size_vs_unpruned=s["total_bytes"] / base["total_bytes"] if base else "",
                         stored_param_ratio=stored_ratio.get(run, "")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=cache_dir("exports", "bench-gguf"))
    ap.add_argument("--positions", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    reports = export_all(args.out)
    stored = {run: read_metadata(RUNS[run])["parameters"]["stored_ratio"] for run in ("shortgpt", "flexigpt")}
    stored["unpruned"] = 1.0
    par = parity(reports, args.positions)
    speed = timing(reports, args.repeats)
    rss = peak_rss(reports)
    fx = {t: reports["flexigpt", t, "compact"]["storage"] for t in TYPES}
    un = {t: reports["unpruned", t, "compact"]["storage"] for t in TYPES}
    summary = dict(
        f32_logit_max_abs_diff=par["f32"]["max_abs_diff"], f32_argmax_agreement=par["f32"]["argmax_agreement"],
        f16_bytes_over_unique=fx["f16"]["bytes_over_unique"], q8_0_bytes_over_unique=fx["q8_0"]["bytes_over_unique"],
        f16_size_ratio_vs_unpruned=fx["f16"]["total_bytes"] / un["f16"]["total_bytes"],
        stored_param_ratio=stored["flexigpt"],
        decode_time_ratio_flexigpt_vs_unpruned=speed["flexigpt"]["decode_time_ratio"],
        decode_time_ratio_shortgpt_vs_unpruned=speed["shortgpt"]["decode_time_ratio"],
        prefill_time_ratio_flexigpt_vs_unpruned=speed["flexigpt"]["prefill_time_ratio"],
    )
    rows = size_rows(reports, stored)
    table = "\n\n".join([
        "GGUF sizes (data_over_unique: tensor data / unique params x bytes per element of each stored type)",
        common.markdown_table(rows, ["run", "type", "layout", "model_MiB", "adapters_MiB", "data_over_unique",
                                     "file_over_unique", "size_vs_unpruned", "stored_param_ratio", "note"]),
        f"FlexiGPT llama.cpp vs PyTorch fp32 logits ({args.positions} positions of alice29, adapters on)",
        common.markdown_table([dict(type=t, **v) for t, v in par.items()],
                              ["type", "max_abs_diff", "mean_abs_diff", "argmax_agreement", "positions"]),
        f"llama.cpp F16, 2 threads, medians of {args.repeats} interleaved repeats; peak RSS with mmap",
        common.markdown_table([dict(run=r, **speed[r], **rss[r]) for r in speed],
                              ["run", "pp128_tps", "tg128_tps", "prefill_time_ratio", "decode_time_ratio",
                               "model_rss_bytes", "llama_model_size"]),
    ])
    details = dict(exports={"/".join(k): v for k, v in reports.items()}, parity=par, timing=speed, rss=rss,
                   sizes=rows)
    path = common.write_result("gguf", summary, vars(args) | dict(out=str(args.out), timing_type="f16", threads=2),
                               details, table)
    print(json.dumps(summary, indent=2))
    print(table)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
