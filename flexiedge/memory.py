"""Wall time and peak resident memory per stage, so large-model runs show where memory goes.

Linux keeps a high-water mark of each process's RSS (VmHWM) and resets it when "5" is written to
/proc/self/clear_refs, so one process can measure the peak of each of its stages in turn. Elsewhere
the peak is the process's lifetime maximum (ru_maxrss), a safe upper bound.

    log = StageLog(print_to_stderr=args.report_memory)
    with log.stage("score"):
        ...
    log.records  # [{"stage": "score", "seconds": 12.3, "peak_rss_gb": 2.1}]
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field

GB = 1e9


def proc_bytes(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc file, in bytes; None where there is no /proc."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    found = proc_bytes("/proc/self/status", "VmHWM")
    return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory_bytes() -> int:
    """Memory the system can give without swapping (MemAvailable); 16 GiB where it cannot say."""
    found = proc_bytes("/proc/meminfo", "MemAvailable")
    return found if found is not None else 16 * 2**30


def reset_peak_rss() -> bool:
    """Start a new high-water mark; False where the platform cannot (the peak then covers earlier stages)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class StageLog:
    print_to_stderr: bool = False
    records: list[dict] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str):
        reset_peak_rss()
        start = time.perf_counter()
        yield
        record = dict(stage=name, seconds=round(time.perf_counter() - start, 3),
                      peak_rss_gb=round(peak_rss_bytes() / GB, 3))
        self.records.append(record)
        if self.print_to_stderr:
            print(f"stage {name}: {record['seconds']:.1f} s, peak RSS {record['peak_rss_gb']:.2f} GB", file=sys.stderr)
