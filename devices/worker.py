"""One measurement in a fresh process, so that its peak RSS is the runtime's and nobody else's.

    python -m flexiedge.devices.worker ARTIFACT --threads 2 --prompt 128 --gen 128 --repeats 3 --warmup 1

Prints one JSON line: the RSS before loading, the peak RSS (VmHWM: anonymous + file-mapped pages, so the
mmapped weights count), and one {ttft_s, prefill_tps, decode_tps} per repeat after the warm-up runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexiedge.memory import proc_bytes


def status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (0 where there is no /proc)."""
    return proc_bytes("/proc/self/status", key) or 0


def load(artifact: Path, runtime: str, threads: int, n_ctx: int):
    if runtime == "llamacpp":
        from flexiedge.runtimes.llamacpp import LlamaCppModel
        model = artifact if artifact.suffix == ".gguf" else artifact / "model.gguf"
        adapters = model.with_name("adapters.gguf")
        return LlamaCppModel.load(model, adapters if adapters.is_file() else None, n_threads=threads, n_ctx=n_ctx)
    from flexiedge.runtimes.onnxruntime import OrtModel
    return OrtModel.load(artifact, threads=threads, tokenizer=False)


def measure(artifact: Path, runtime: str, threads: int, prompt: int, gen: int, repeats: int, warmup: int) -> dict:
    before = status_bytes("VmRSS")
    model = load(artifact, runtime, threads, n_ctx=prompt + gen + 8)
    for _ in range(warmup):
        model.time(prompt_tokens=prompt, gen_tokens=min(gen, 16))
    runs = [model.time(prompt_tokens=prompt, gen_tokens=gen) for _ in range(repeats)]
    return dict(rss_before=before, rss_peak=status_bytes("VmHWM"),
                rss_file=status_bytes("RssFile"), runs=runs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--runtime", required=True, choices=["llamacpp", "onnxruntime"])
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.artifact, a.runtime, a.threads, a.prompt, a.gen, a.repeats, a.warmup)))


if __name__ == "__main__":
    main()
