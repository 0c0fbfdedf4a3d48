"""The estimate for a device we cannot run on: decode from bandwidth, prefill from FLOPs, fit from RAM.

    decode t/s  = efficiency x bandwidth / bytes read per token          (METHOD.md: efficiency 0.5-0.7)
    prefill t/s = prefill_efficiency x GEMM FLOP rate / FLOPs per token
    resident    = unique weight bytes (mmapped once) + KV cache for n_ctx + runtime overhead

Decode is memory-bound on every target here: one token multiplies each weight once, 2 FLOPs per weight
byte at 8 bits, far below what the cores can do per byte of bandwidth. Prefill multiplies a whole prompt
by each weight read, so it is compute-bound and uses the FLOP rate instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .footprint import Footprint
from .profiles import DeviceProfile

MIB = 2**20


@dataclass
class Settings:
    """The workload, llama-bench style: pp`prompt` and tg`gen`, and the context the KV cache is sized for."""
    prompt: int = 128
    gen: int = 128
    n_ctx: int = 512

    @property
    def decode_position(self) -> int:
        """Mean number of earlier tokens a generated token attends over."""
        return self.prompt + self.gen // 2


def decode_tps(efficiency: float, bandwidth_gbps: float, bytes_per_token: float) -> float:
    return efficiency * bandwidth_gbps * 1e9 / bytes_per_token


def prefill_tps(prefill_efficiency: float, gflops: float, flops_per_token: float) -> float:
    return prefill_efficiency * gflops * 1e9 / flops_per_token


@dataclass
class Estimate:
    device: str
    model: str
    runtime: str
    bandwidth_gbps: float
    efficiency: float
    bytes_per_token: int
    decode_tps: float
    prefill_tps: float
    ttft_s: float
    resident_bytes: int
    ram_budget_bytes: int
    fits: bool

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(fp: Footprint, profile: DeviceProfile, settings: Settings,
             bandwidth_gbps: float | None = None, gflops: float | None = None,
             efficiency: float | None = None) -> Estimate:
    """The estimate of one footprint on one device (bandwidth / FLOP rate / efficiency override the profile's)."""
    bw = bandwidth_gbps or profile.bandwidth_gbps
    eff = efficiency or profile.efficiency.get(fp.runtime) or min(profile.efficiency.values())
    per_token = fp.bytes_per_token(settings.decode_position)
    prefill = prefill_tps(profile.prefill_efficiency, gflops or profile.gflops, fp.flops_per_token(settings.prompt // 2))
    resident = fp.resident_bytes(settings.n_ctx, int(profile.overhead_mib * MIB))
    return Estimate(device=profile.name, model=fp.name, runtime=fp.runtime, bandwidth_gbps=bw, efficiency=eff,
                    bytes_per_token=per_token, decode_tps=decode_tps(eff, bw, per_token), prefill_tps=prefill,
                    ttft_s=settings.prompt / prefill, resident_bytes=resident,
                    ram_budget_bytes=profile.ram_budget_bytes, fits=resident <= profile.ram_budget_bytes)
