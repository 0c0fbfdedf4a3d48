"""Measure artifacts on this host (each in a fresh subprocess) and estimate them on every other device.

    rows = profile_artifacts(footprints, profiles, Settings(prompt=128, gen=64), MeasureConfig(repeats=3))

A row is one (artifact, device): `measured` rows come from running it here, `estimated` rows from
devices/estimate.py. For the host both exist, and the estimate's signed error against the measurement is
reported: (predicted - measured) / measured.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from flexiedge.errors import FlexiEdgeError

from .estimate import Settings, estimate
from .footprint import Footprint
from .hostbench import HostBench, run_hostbench
from .profiles import DeviceProfile

MIB = 2**20


@dataclass
class MeasureConfig:
    repeats: int = 3            # timed runs after the warm-up, in one process
    warmup: int = 1
    timeout_s: float = 1800
    threads: int | None = None  # override the host profile's threads


@dataclass
class Measurement:
    ttft_s: list[float]
    prefill_tps: list[float]
    decode_tps: list[float]
    rss_peak: int               # VmHWM of the runtime process
    rss_model: int              # peak minus the process before loading (the interpreter and imports)
    rss_file: int               # file-backed pages resident at the end (the mmapped weights)
    threads: int

    @classmethod
    def from_worker(cls, out: dict, threads: int) -> "Measurement":
        runs = out["runs"]
        return cls([r["ttft_s"] for r in runs], [r["prefill_tps"] for r in runs], [r["decode_tps"] for r in runs],
                   out["rss_peak"], out["rss_peak"] - out["rss_before"], out["rss_file"], threads)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def measure(fp: Footprint, settings: Settings, threads: int, config: MeasureConfig) -> Measurement:
    """Run the worker in a fresh Python process: its peak RSS is this model's alone."""
    cmd = [sys.executable, "-m", "flexiedge.devices.worker", fp.path, "--runtime", fp.runtime,
           "--threads", str(threads), "--prompt", str(settings.prompt), "--gen", str(settings.gen),
           "--repeats", str(config.repeats), "--warmup", str(config.warmup)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=config.timeout_s)
    except subprocess.TimeoutExpired:
        raise FlexiEdgeError(f"measuring {fp.name} took longer than {config.timeout_s:.0f} s") from None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise FlexiEdgeError(f"measuring {fp.name} failed: {tail[0]}")
    return Measurement.from_worker(json.loads(done.stdout.strip().splitlines()[-1]), threads)


@dataclass
class Row:
    """One line of the table: an artifact on a device, measured or estimated."""
    model: str
    method: str
    runtime: str
    type: str
    device: str
    source: str                 # measured | estimated
    size_bytes: int             # files on disk
    resident_bytes: int         # measured: peak RSS of the model; estimated: unique + KV + overhead
    bytes_per_token: int
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    ttft_sd: float = 0.0
    prefill_sd: float = 0.0
    decode_sd: float = 0.0
    fits: bool | None = None
    ram_budget_bytes: int | None = None
    decode_rel_error: float | None = None  # host estimate only: (predicted - measured) / measured
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def measured_row(fp: Footprint, m: Measurement, settings: Settings, profile: DeviceProfile) -> Row:
    (ttft, ttft_sd), (pp, pp_sd), (tg, tg_sd) = mean_sd(m.ttft_s), mean_sd(m.prefill_tps), mean_sd(m.decode_tps)
    return Row(fp.name, fp.method, fp.runtime, fp.type, profile.name, "measured", fp.file_bytes, m.rss_model,
               fp.bytes_per_token(settings.decode_position), ttft, pp, tg, ttft_sd, pp_sd, tg_sd,
               fits=m.rss_model <= profile.ram_budget_bytes, ram_budget_bytes=profile.ram_budget_bytes,
               extra=dict(measurement=asdict(m)))


def estimated_row(fp: Footprint, profile: DeviceProfile, settings: Settings, bench: HostBench | None = None,
                  measured: Row | None = None) -> Row:
    """The estimate; on the host it uses the measured bandwidth / FLOP rate and reports its error."""
    host = profile.measured and bench is not None
    e = estimate(fp, profile, settings, bandwidth_gbps=bench.bandwidth_gbps if host else None,
                 gflops=bench.gflops if host else None)
    error = (e.decode_tps - measured.decode_tps) / measured.decode_tps if measured else None
    return Row(fp.name, fp.method, fp.runtime, fp.type, profile.name, "estimated", fp.file_bytes, e.resident_bytes,
               e.bytes_per_token, e.ttft_s, e.prefill_tps, e.decode_tps, fits=e.fits,
               ram_budget_bytes=e.ram_budget_bytes, decode_rel_error=error, extra=dict(estimate=e.as_dict()))


def profile_artifacts(footprints: list[Footprint], profiles: list[DeviceProfile], settings: Settings,
                      config: MeasureConfig, hostbench: bool = True) -> tuple[list[Row], HostBench | None]:
    """Measured rows for the host profile(s), estimated rows for every profile (the host's checked)."""
    hosts = [p for p in profiles if p.measured]
    bench = run_hostbench(config.threads or hosts[0].threads) if hosts and hostbench else None
    rows = []
    for fp in footprints:
        for profile in profiles:
            measured = None
            if profile.measured:
                m = measure(fp, settings, config.threads or profile.threads, config)
                measured = measured_row(fp, m, settings, profile)
                rows.append(measured)
            rows.append(estimated_row(fp, profile, settings, bench, measured))
    return rows, bench
