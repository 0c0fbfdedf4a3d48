"""Device profiles benchmark: SmolLM2-135M unpruned / ShortGPT / FlexiGPT (30%) measured on this host, estimated
on every profile in devices/profiles/, the host's decode estimate checked against its measurement, and a
LLaMA-2-7B at 30%: with --llama7b, the real exports of benchmarks/scale.py (measured here, estimated on every
other profile); without it, the analytic one (9/32 blocks, rank 256), estimated only.

    flexiedge export gguf runs/smollm2-30 --out runs/exports/devices/flexigpt-gguf-q8_0 --type q8_0   # and
    # shortgpt- / unpruned- (runs/smollm2-30-shortgpt, smollm2-135m); onnx int8 likewise (*-onnx-int8)
    nice -n 5 python benchmarks/devices.py        # -> benchmarks/results/devices.json + devices.md + devices.png
    python benchmarks/devices.py --llama7b /work/scale/7b-export_gguf_q4k /work/scale/7b-export_onnx_int4

Calibration never sees what it is checked on: per runtime the efficiency factor is fitted on the UNPRUNED
export only (measured decode x bytes per token / measured bandwidth), then predicts ShortGPT and FlexiGPT;
the headline error is FlexiGPT llama.cpp q8_0. Rounds interleave a bandwidth measurement with one fresh
subprocess per model, so a round's load hits all of them alike; medians over rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/gguf.py shadows gguf

from flexiedge.devices.analytic import LLAMA2_7B, llama7b_footprints  # noqa: E402
from flexiedge.devices.estimate import Settings, decode_tps  # noqa: E402
from flexiedge.devices.footprint import footprint  # noqa: E402
from flexiedge.devices.hostbench import copy_bandwidth, run_hostbench  # noqa: E402
from flexiedge.devices.profiler import MeasureConfig, Measurement, estimated_row, measure, measured_row  # noqa: E402
from flexiedge.devices.profiles import known_profiles, load_profile  # noqa: E402
from flexiedge.devices.report import plot, table  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_common", HERE / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

EXPORTS = HERE.parent / "runs/exports/devices"
NAMES = [f"{m}-{fmt}" for fmt in ("gguf-q8_0", "onnx-int8") for m in ("unpruned", "shortgpt", "flexigpt")]
PHONES = ("phone-snapdragon-8gen3", "phone-apple-a17pro", "phone-midrange-android")


def run_rounds(fps, settings, threads, rounds) -> tuple[list[float], dict[str, list[Measurement]]]:
    """Per round: bandwidth, then every model in a fresh process (one timed run each)."""
    bws, found = [], {fp.name: [] for fp in fps}
    for r in range(rounds):
        bws.append(statistics.median(copy_bandwidth(threads, trials=5)))
        for fp in fps:
            found[fp.name].append(measure(fp, settings, threads, MeasureConfig(repeats=1, warmup=1)))
            print(f"round {r}: {fp.name} decode {found[fp.name][-1].decode_tps[0]:.2f} t/s, bw {bws[-1]:.2f} GB/s",
                  flush=True)
    return bws, found


def merged(ms: list[Measurement]) -> Measurement:
    return Measurement([x for m in ms for x in m.ttft_s], [x for m in ms for x in m.prefill_tps],
                       [x for m in ms for x in m.decode_tps], max(m.rss_peak for m in ms),
                       statistics.median(m.rss_model for m in ms), max(m.rss_file for m in ms), ms[0].threads)


def calibrate(fps, bws, found, settings) -> dict:
    """Per runtime: efficiency from the unpruned export, then signed errors on the others."""
    out = {}
    for runtime in sorted({fp.runtime for fp in fps}):
        group = {fp.method: fp for fp in fps if fp.runtime == runtime}
        base = group["unpruned"]
        effs = [m.decode_tps[0] * base.bytes_per_token(settings.decode_position) / (bw * 1e9)
                for m, bw in zip(found[base.name], bws)]
        eff = statistics.median(effs)
        checks = {}
        for method, fp in group.items():
            measured = statistics.median(m.decode_tps[0] for m in found[fp.name])
            predicted = statistics.median(decode_tps(eff, bw, fp.bytes_per_token(settings.decode_position)) for bw in bws)
            checks[method] = dict(model=fp.name, measured_tps=measured, predicted_tps=predicted,
                                  rel_error=(predicted - measured) / measured, calibration=method == "unpruned")
        out[runtime] = dict(efficiency=eff, efficiency_per_round=effs, calibrated_on=base.name, checks=checks)
    return out


def llama7b_rows(fps, host, host_cal, bench, settings, big) -> list:
    """Each real 7B export: measured on the host (one timed run), the host's estimate, and every other profile."""
    rows = []
    for fp in fps:
        m = measured_row(fp, measure(fp, settings, host.threads, MeasureConfig(repeats=1, warmup=0, timeout_s=1800)),
                         settings, host)
        rows += [m, estimated_row(fp, host_cal, settings, bench, m)]
        rows += [estimated_row(fp, load_profile(n), big) for n in known_profiles() if n != "host"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--names", nargs="+", default=NAMES)
    p.add_argument("--threads", type=int, help="override the host profile's threads (1 resists a busy machine: "
                   "llama.cpp's threads spin at barriers, and a descheduled partner stalls them)")
    p.add_argument("--llama7b", nargs="+", type=Path, help="export folders of the random-weight 7B "
                   "(benchmarks/scale.py keeps its GGUF Q4_K and ONNX int4): measured here, estimated on the "
                   "phones, instead of the analytic 7B")
    p.add_argument("--prompt-7b", type=int, default=16)
    p.add_argument("--gen-7b", type=int, default=16)
    a = p.parse_args()
    settings = Settings(prompt=a.prompt, gen=a.gen, n_ctx=512)
    host = load_profile("host")
    host = replace(host, threads=a.threads or host.threads)
    fps = [footprint(EXPORTS / n) for n in a.names if (EXPORTS / n).is_dir()]
    bws, found = run_rounds(fps, settings, host.threads, a.rounds)
    cal = calibrate(fps, bws, found, settings)
    bench = run_hostbench(host.threads)
    bench.bandwidth_gbps, bench.bandwidth_trials = statistics.median(bws), bws  # the interleaved measurements
    host_cal = replace(host, efficiency={rt: c["efficiency"] for rt, c in cal.items()})
    rows = []
    for fp in fps:
        m = measured_row(fp, merged(found[fp.name]), settings, host)
        rows += [m, estimated_row(fp, host_cal, settings, bench, m)]
        rows += [estimated_row(fp, load_profile(n), settings) for n in known_profiles() if n != "host"]
    big = replace(settings, n_ctx=2048)
    if a.llama7b:  # real exports of the 7B-shaped model (benchmarks/scale.py): measured here too
        fps7b = [footprint(d) for d in a.llama7b]
        rows7b = llama7b_rows(fps7b, host, host_cal, bench, replace(settings, prompt=a.prompt_7b, gen=a.gen_7b), big)
        flexi7b = next(fp for fp in fps7b if fp.runtime == "llamacpp")
    else:
        rows7b = [estimated_row(fp, load_profile(n), big) for fp in llama7b_footprints()
                  for n in known_profiles() if n != "host"]
        flexi7b = next(fp for fp in llama7b_footprints() if fp.name == "llama7b-30-flexigpt-q4_k")
    summary = dict(host_decode_prediction_rel_error=cal["llamacpp"]["checks"]["flexigpt"]["rel_error"],
                   host_decode_prediction_checked_on="flexigpt-gguf-q8_0 (efficiency calibrated on unpruned-gguf-q8_0)",
                   host_bandwidth_gbps=bench.bandwidth_gbps, host_gflops=bench.gflops,
                   host_efficiency_llamacpp=cal["llamacpp"]["efficiency"],
                   llama7b_30_q4k_gguf_bytes=flexi7b.file_bytes,
                   llama7b_30_q4k_gguf_bytes_per_token=flexi7b.weight_bytes_per_token,
                   llama7b_30_int4_onnx_bytes=next(fp.file_bytes for fp in (fps7b if a.llama7b else llama7b_footprints())
                                                   if fp.runtime == "onnxruntime" and fp.method == "flexigpt"),
                   llama7b_source="measured exports of a random-weight 7B (benchmarks/scale.py)" if a.llama7b
                   else "analytic (devices/analytic.py)")
    for r in rows7b:
        if r.model == flexi7b.name and r.device == "host":
            summary[f"llama7b_30_host_{r.source}_decode_tps"] = r.decode_tps
            if r.decode_rel_error is not None:
                summary["llama7b_30_host_decode_prediction_rel_error"] = r.decode_rel_error
    if "flexigpt" in cal.get("onnxruntime", {}).get("checks", {}):
        summary["host_decode_prediction_rel_error_onnx_int8"] = cal["onnxruntime"]["checks"]["flexigpt"]["rel_error"]
    for r in rows7b:
        if r.model == flexi7b.name and r.device in PHONES:
            summary[f"llama7b_30_fits_{r.device}"] = r.fits
            summary[f"llama7b_30_decode_tps_{r.device}"] = r.decode_tps
            summary[f"llama7b_30_resident_bytes_{r.device}"] = r.resident_bytes
    plot(rows, common.RESULTS / "devices.png", "SmolLM2-135M: storage vs decode latency (30% pruned)")
    kind = "random-weight exports, measured on the host" if a.llama7b else "analytic, estimated"
    plot(rows7b, common.RESULTS / "devices-llama7b.png", f"LLaMA-2-7B at 30% ({kind})")
    text = table(rows) + f"\n\nLLaMA-2-7B at 30% (10/32 blocks), {kind}:\n\n" + table(rows7b)
    print(text)
    common.write_result("devices", summary, dict(settings=vars(settings), threads=host.threads, rounds=a.rounds,
                                                 llama7b_shape=vars(LLAMA2_7B), llama7b_n_ctx=2048),
                        dict(calibration=cal, hostbench=bench.as_dict(), rows=[r.as_dict() for r in rows],
                             llama7b_rows=[r.as_dict() for r in rows7b],
                             footprints=[fp.as_dict() for fp in fps + (fps7b if a.llama7b else llama7b_footprints())]),
                        table=text)


if __name__ == "__main__":
    main()
