"""Memory of self-speculative decoding on onnxruntime: does the draft session cost weight memory?

    python benchmarks/speculative_memory.py runs/exports/spec-onnx/smollm2-30   # an export with --draft

Each configuration runs in a fresh process: load the session(s), decode a few tokens (speculatively when
there is a draft), then report peak RSS (ru_maxrss) and, from /proc/self/smaps_rollup, RSS split into
file-backed and anonymous memory. Weight bytes mapped from model.onnx.data are file-backed (page cache,
shared with every process mapping the file); ORT's own copies of weights are anonymous.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path and its onnx.py would shadow the onnx package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

CONFIGS = {
    "full": dict(draft=False, share=False, prepack=True),
    "full_no_prepack": dict(draft=False, share=False, prepack=False),
    "full_no_prepack_no_folding": dict(draft=False, share=False, prepack=False, fold=False),
    "full+draft_unshared": dict(draft=True, share=False, prepack=True),
    "full+draft_shared": dict(draft=True, share=True, prepack=False),
    "full+draft_shared_prepack": dict(draft=True, share=True, prepack=True),
}


def smaps() -> dict[str, int]:
    found = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        found[key] = int(value.split()[0]) * 1024
    return found


def child(folder: str, name: str) -> dict:
    from flexiedge.runtimes.onnxruntime import OrtDecoder, OrtModel, load_pair
    from flexiedge.runtimes.pytorch import greedy_generate
    from flexiedge.runtimes.speculative import speculative_generate

    c = CONFIGS[name]
    before = smaps()
    prompt = list(range(5, 37))
    if c["draft"]:
        full, draft = load_pair(folder, threads=1, tokenizer=False, share=c["share"], prepack=c["prepack"])
        t0 = time.perf_counter()
        speculative_generate(OrtDecoder(full), OrtDecoder(draft), prompt, 16, 2)
    else:
        model = OrtModel.load(folder, threads=1, tokenizer=False, prepack=c["prepack"],
                              fold_constants=c.get("fold", True))
        t0 = time.perf_counter()
        greedy_generate(OrtDecoder(model), prompt, 16)
    seconds = time.perf_counter() - t0
    after = smaps()
    return dict(config=name, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                rss=after["Rss"], pss=after["Pss"], anonymous=after["Anonymous"],
                rss_growth=after["Rss"] - before["Rss"], anonymous_growth=after["Anonymous"] - before["Anonymous"],
                file_backed=after["Rss"] - after["Anonymous"], rss_before_load=before["Rss"], decode_s=seconds)


def main():
    if len(sys.argv) == 3:
        print(json.dumps(child(sys.argv[1], sys.argv[2])))
        return
    folder = sys.argv[1]
    data = (Path(folder) / "model.onnx.data").stat().st_size
    print(f"model.onnx.data: {data / 2**20:.1f} MiB")
    print("MiB; 'growth' = after decoding minus before loading (python + torch + onnxruntime imported)")
    print(f"{'config':28s} {'peak RSS':>9s} {'RSS':>9s} {'anon':>9s} {'file':>9s} {'PSS':>9s} "
          f"{'RSS grow':>9s} {'anon grow':>9s}  decode s")
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, folder, name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mib = {k: v / 2**20 for k, v in r.items() if isinstance(v, int)}
        print(f"{name:28s} {mib['peak_rss']:9.1f} {mib['rss']:9.1f} {mib['anonymous']:9.1f} {mib['file_backed']:9.1f} "
              f"{mib['pss']:9.1f} {mib['rss_growth']:9.1f} {mib['anonymous_growth']:9.1f}  {r['decode_s']:.2f}")


if __name__ == "__main__":
    main()
