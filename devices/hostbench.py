"""This host's memory bandwidth and matmul FLOP rate, so that its estimate can be checked against its measurement.

Bandwidth is a STREAM-style copy (`dst.copy_(src)` on arrays far larger than the last-level cache),
counted as STREAM counts it: bytes read + bytes written. Decode streams weights, so this is the number
the estimate divides by. The FLOP rate is a square fp32 matmul. Both use `threads` threads (the
profile's), and report the median of several trials: the machine is shared and noisy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass


@dataclass
class HostBench:
    bandwidth_gbps: float       # median copy bandwidth, read + write bytes / s / 1e9
    bandwidth_trials: list[float]
    gflops: float               # median fp32 matmul rate
    gflops_trials: list[float]
    threads: int
    method: str = "torch copy_ of 2 x 256 MiB fp32 (read+write bytes); torch fp32 matmul 1024^3"

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(fn, trials: int) -> list[float]:
    fn()  # warm-up: page faults and thread-pool start-up are not bandwidth
    out = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(threads: int, mib: int = 256, trials: int = 7) -> list[float]:
    import torch
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), trials)
    return [2 * src.numel() * 4 / s / 1e9 for s in seconds]


def matmul_gflops(threads: int, n: int = 1024, trials: int = 7) -> list[float]:
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = _timed(lambda: a @ b, trials)
    return [2 * n**3 / s / 1e9 for s in seconds]


def run_hostbench(threads: int, trials: int = 7) -> HostBench:
    bw, fl = copy_bandwidth(threads, trials=trials), matmul_gflops(threads, trials=trials)
    return HostBench(statistics.median(bw), bw, statistics.median(fl), fl, threads)
