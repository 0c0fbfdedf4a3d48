"""ONNX export benchmark: sizes, parity, quantisation quality and speed of unpruned / ShortGPT / FlexiGPT
SmolLM2-135M (30%) in onnxruntime against PyTorch eager, measured side by side in one run.

    flexiedge prune --out runs/smollm2-30                                         # FlexiGPT 30%
    flexiedge prune --method shortgpt --ratio 0.3 --out runs/smollm2-30-shortgpt  # ShortGPT 30%
    nice -n 5 python benchmarks/onnx.py                 # -> benchmarks/results/onnx.json + a markdown table

This machine is shared: timings interleave models and runtimes within each repeat and report medians;
the ratios (measured in the same repeat) are what to read, not absolute tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the onnx package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flexiedge.cache import cache_dir  # noqa: E402
from flexiedge.checkpoint import load_checkpoint  # noqa: E402
from flexiedge.data import tokenize_texts  # noqa: E402
from flexiedge.evaluate import perplexity  # noqa: E402
from flexiedge.exporters.onnx import OnnxExportConfig, trace_checkpoint, versions, write_export  # noqa: E402
from flexiedge.runtimes.onnxruntime import OrtModel  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "onnx.json"


@dataclass
class Settings:
    unpruned: str = "smollm2-135m"
    shortgpt: str = "runs/smollm2-30-shortgpt"
    flexigpt: str = "runs/smollm2-30"
    work: str = ""                 # export folders (default: $FLEXIEDGE_CACHE/exports/bench-onnx)
    threads: int = 2
    prompt_tokens: int = 128
    gen_tokens: int = 32
    repeats: int = 3
    ppl_text: str = "alice29"
    ppl_tokens: int = 1024
    ppl_context: int = 512
    reuse: bool = False            # reuse export folders from an earlier run


def torch_time(model, prompt_tokens: int, gen_tokens: int, vocab: int) -> dict[str, float]:
    """PyTorch eager mirror of OrtModel.time: same synthetic prompt, greedy, KV cache, fixed step count."""
    from transformers import DynamicCache

    ids = torch.from_numpy(np.random.default_rng(0).integers(min(300, vocab // 2), vocab, (1, prompt_tokens)))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        tok = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1].argmax().view(1, 1)
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            tok = model(input_ids=tok, cache=cache, use_cache=True).logits[0, -1].argmax().view(1, 1)
        t2 = time.perf_counter()
    return dict(ttft_s=t1 - t0, prefill_tps=prompt_tokens / (t1 - t0), decode_tps=gen_tokens / (t2 - t1))


def export_all(settings: Settings) -> tuple[dict, dict]:
    """Export fp32 of every model and fp16/int8/int4 of FlexiGPT; one trace per model."""
    work = Path(settings.work or cache_dir("exports", "bench-onnx"))
    jobs = {"unpruned": ["fp32"], "shortgpt": ["fp32"], "flexigpt": ["fp32", "fp16", "int8", "int4"]}
    folders, reports, checkpoints = {}, {}, {}
    for name, precisions in jobs.items():
        ckpt = load_checkpoint(Path(getattr(settings, name)))
        checkpoints[name] = ckpt
        todo = [p for p in precisions if not (settings.reuse and (work / f"{name}-{p}" / "model.onnx").is_file())]
        traced = None
        if todo:
            t0 = time.perf_counter()
            traced = trace_checkpoint(ckpt)
            print(f"traced {name} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        for precision in precisions:
            out = work / f"{name}-{precision}"
            if precision in todo:
                reports[f"{name}-{precision}"] = write_export(ckpt, traced, out, OnnxExportConfig(precision=precision),
                                                              overwrite=True)
            else:
                reports[f"{name}-{precision}"] = json.loads((out / "flexiedge-export.json").read_text())
            folders[f"{name}-{precision}"] = out
        del traced
    return dict(folders=folders, checkpoints=checkpoints), reports


def quality(settings: Settings, checkpoints: dict, folders: dict) -> dict:
    """PPL on held-out text (torch vs ORT at each precision) and argmax agreement with torch fp32."""
    ckpt = checkpoints["flexigpt"]
    ids = tokenize_texts(ckpt.tokenizer, [settings.ppl_text])[: settings.ppl_tokens + 1]
    torch_ppl = perplexity(ckpt.model, ids, context=settings.ppl_context, progress=False).ppl
    window = ids[: settings.ppl_context]
    with torch.no_grad():
        want = ckpt.model(input_ids=window[None]).logits[0].argmax(-1).numpy()
    out = dict(torch_fp32_ppl=torch_ppl)
    for precision in ("fp32", "fp16", "int8", "int4"):
        m = OrtModel.load(folders[f"flexigpt-{precision}"], threads=settings.threads, tokenizer=False)
        out[f"{precision}_ppl"] = m.score(ids.numpy(), context=settings.ppl_context).ppl
        out[f"{precision}_argmax_agreement"] = float((m.logits(window.tolist()).argmax(-1) == want).mean())
        del m
    return out


def speed(settings: Settings, checkpoints: dict, folders: dict) -> dict:
    """Interleaved repeats: in each, every (model, runtime) is timed once; medians per pair."""
    torch.set_num_threads(settings.threads)
    runners = {}
    for name in ("unpruned", "shortgpt", "flexigpt"):
        ort_model = OrtModel.load(folders[f"{name}-fp32"], threads=settings.threads, tokenizer=False)
        vocab = checkpoints[name].model.config.vocab_size
        runners[f"{name}/ort-fp32"] = ort_model.time
        runners[f"{name}/torch"] = (lambda m, v: (lambda p, g: torch_time(m, p, g, v)))(checkpoints[name].model, vocab)
    for precision in ("int8", "int4"):
        runners[f"flexigpt/ort-{precision}"] = OrtModel.load(folders[f"flexigpt-{precision}"], threads=settings.threads,
                                                             tokenizer=False).time
    for run in runners.values():  # warm-up: first calls allocate and (ORT) finish lazy initialisation
        run(16, 2)
    samples = {k: [] for k in runners}
    for r in range(settings.repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for key in order:
            samples[key].append(runners[key](settings.prompt_tokens, settings.gen_tokens))
            print(f"repeat {r + 1}/{settings.repeats} {key}: {samples[key][-1]['decode_tps']:.1f} t/s decode",
                  file=sys.stderr)
    med = {k: {m: statistics.median(s[m] for s in v) for m in v[0]} for k, v in samples.items()}
    def ratio(a, b, metric="decode_tps"):
        """Time of a / time of b, per repeat (both measured in the same repeat), then the median."""
        return statistics.median(y[metric] / x[metric] for x, y in zip(samples[a], samples[b]))
    ratios = dict(
        decode_time_ratio_flexigpt_vs_unpruned=ratio("flexigpt/ort-fp32", "unpruned/ort-fp32"),
        decode_time_ratio_shortgpt_vs_unpruned=ratio("shortgpt/ort-fp32", "unpruned/ort-fp32"),
        decode_time_ratio_ort_vs_torch=ratio("flexigpt/ort-fp32", "flexigpt/torch"),
        decode_time_ratio_ort_vs_torch_unpruned=ratio("unpruned/ort-fp32", "unpruned/torch"),
        prefill_time_ratio_ort_vs_torch=ratio("flexigpt/ort-fp32", "flexigpt/torch", "prefill_tps"),
        decode_time_ratio_flexigpt_int8_vs_fp32=ratio("flexigpt/ort-int8", "flexigpt/ort-fp32"),
        decode_time_ratio_flexigpt_int4_vs_fp32=ratio("flexigpt/ort-int4", "flexigpt/ort-fp32"),
    )
    return dict(median=med, samples=samples, ratios=ratios)


def summarise(reports: dict, checkpoints: dict, q: dict, s: dict) -> dict:
    size = {k: r["storage"]["data_bytes"] for k, r in reports.items()}
    params = checkpoints["flexigpt"].metadata["parameters"]
    return dict(
        fp32_logit_max_abs_diff=max(reports[f"{m}-fp32"]["verify"]["logit_max_abs_diff"]
                                    for m in ("unpruned", "shortgpt", "flexigpt")),
        fp32_bytes_over_unique=reports["flexigpt-fp32"]["storage"]["bytes_over_unique"],
        fp16_bytes_over_unique=reports["flexigpt-fp16"]["storage"]["bytes_over_unique"],
        int8_shared_weights_single_copy=reports["flexigpt-int8"]["storage"]["shared_single_copy"],
        int4_shared_weights_single_copy=reports["flexigpt-int4"]["storage"]["shared_single_copy"],
        fp32_size_ratio_vs_unpruned=size["flexigpt-fp32"] / size["unpruned-fp32"],
        shortgpt_fp32_size_ratio_vs_unpruned=size["shortgpt-fp32"] / size["unpruned-fp32"],
        stored_param_ratio=params["stored_ratio"],
        **{k: s["ratios"][k] for k in ("decode_time_ratio_flexigpt_vs_unpruned", "decode_time_ratio_shortgpt_vs_unpruned",
                                       "decode_time_ratio_ort_vs_torch", "prefill_time_ratio_ort_vs_torch")},
        int8_size_ratio_vs_fp32=size["flexigpt-int8"] / size["flexigpt-fp32"],
        int4_size_ratio_vs_fp32=size["flexigpt-int4"] / size["flexigpt-fp32"],
        int8_argmax_agreement=q["int8_argmax_agreement"],
        int4_argmax_agreement=q["int4_argmax_agreement"],
        fp32_ppl_delta=q["fp32_ppl"] - q["torch_fp32_ppl"],
        int8_ppl_delta=q["int8_ppl"] - q["torch_fp32_ppl"],
        int4_ppl_delta=q["int4_ppl"] - q["torch_fp32_ppl"],
    )


def table(reports: dict, s: dict) -> str:
    rows = ["| model | runtime | weights MiB | TTFT s | prefill t/s | decode t/s |", "|---|---|---|---|---|---|"]
    for key, m in s["median"].items():
        name, runtime = key.split("/")
        export = f"{name}-{runtime.split('-', 1)[1]}" if runtime.startswith("ort") else None
        mib = f"{reports[export]['storage']['data_bytes'] / 2**20:.1f}" if export else "(checkpoint)"
        rows.append(f"| {name} | {runtime} | {mib} | {m['ttft_s']:.3f} | {m['prefill_tps']:.0f} | {m['decode_tps']:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f, default in asdict(Settings()).items():
        flag = "--" + f.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    settings = Settings(**vars(parser.parse_args(argv)))
    t0 = time.perf_counter()
    state, reports = export_all(settings)
    q = quality(settings, state["checkpoints"], state["folders"])
    s = speed(settings, state["checkpoints"], state["folders"])
    summary = summarise(reports, state["checkpoints"], q, s)
    result = dict(
        command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        settings=asdict(settings), versions=versions(),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     load_average=os.getloadavg(), note="shared host: read ratios, not absolute rates"),
        summary=summary, quality=q, speed=dict(median=s["median"], ratios=s["ratios"], samples=s["samples"]),
        exports={k: dict(storage=r["storage"], verify=r.get("verify"), config=r["config"]) for k, r in reports.items()},
        wall_s=time.perf_counter() - t0,
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=float))
    print(table(reports, s))
    print()
    print("| summary | value |\n|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
