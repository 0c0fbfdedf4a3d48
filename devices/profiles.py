"""Device profiles: one TOML file per target (threads, memory bandwidth, budgets, efficiency), and the loader.

    load_profile("phone-snapdragon-8gen3")            # a built-in profile, devices/profiles/NAME.toml
    load_profile("my-board.toml")                     # a file of your own
    load_profile("my-board", profiles_dir="boards/")  # a folder of your own, searched before the built-ins

Every number carries its source in the file (a `*_source` string next to it): a profile is data to be
argued with, not a measurement. Only the `host` profile is measured (`measured = true`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from flexiedge.errors import FlexiEdgeError

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"
RUNTIMES = ("llamacpp", "onnxruntime")
GIB = 2**30


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str                       # host | laptop | phone | sbc
    measured: bool                  # True only for this machine: artifacts are run, not estimated
    threads: int
    bandwidth_gbps: float           # memory bandwidth, GB/s (theoretical peak for targets, measured for host)
    bandwidth_source: str
    ram_gib: float
    ram_budget_gib: float           # what one app may keep resident
    storage_budget_gib: float
    gflops: float                   # sustained fp32 GEMM rate of `threads` cores (prefill estimate)
    gflops_source: str
    efficiency: dict[str, float]    # runtime -> fraction of bandwidth that decode achieves
    efficiency_source: str
    prefill_efficiency: float = 0.5  # prefill t/s x FLOPs per token / gflops (can exceed 1: int8 dot products)
    preferred: tuple[str, ...] = RUNTIMES
    overhead_mib: float = 64        # runtime buffers besides weights and KV cache
    path: Path | None = field(default=None, compare=False)

    @property
    def ram_budget_bytes(self) -> int:
        return int(self.ram_budget_gib * GIB)


def _get(data: dict, key: str, kind, where: str):
    """data[key] of the expected type, or a one-line error naming the file and the key."""
    section, _, name = key.rpartition(".")
    node = data
    for part in filter(None, section.split(".")):
        node = node.get(part) if isinstance(node, dict) else None
    value = node.get(name) if isinstance(node, dict) else None
    if value is None or isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise FlexiEdgeError(f"{where}: expected `{key}` ({expected}), got {value!r}")
    return value


def parse_profile(data: dict, where: str, path: Path | None = None) -> DeviceProfile:
    """A profile from parsed TOML; `where` names the source in error messages."""
    num = (int, float)
    efficiency = _get(data, "efficiency", dict, where)
    eff = {rt: float(_get(data, f"efficiency.{rt}", num, where)) for rt in RUNTIMES if rt in efficiency}
    if not eff or any(not 0 < v <= 1 for v in eff.values()):
        raise FlexiEdgeError(f"{where}: expected `efficiency.llamacpp` and/or `efficiency.onnxruntime` in (0, 1], "
                             f"got {efficiency!r}")
    preferred = tuple(data.get("runtime", {}).get("preferred", RUNTIMES))
    unknown = set(preferred) - set(RUNTIMES)
    if unknown:
        raise FlexiEdgeError(f"{where}: unknown runtime(s) {sorted(unknown)} in `runtime.preferred`; "
                             f"use {', '.join(RUNTIMES)}")
    profile = DeviceProfile(
        name=_get(data, "name", str, where), description=data.get("description", ""),
        kind=data.get("kind", "device"), measured=bool(data.get("measured", False)),
        threads=_get(data, "threads", int, where),
        bandwidth_gbps=float(_get(data, "memory.bandwidth_gbps", num, where)),
        bandwidth_source=_get(data, "memory.bandwidth_source", str, where),
        ram_gib=float(_get(data, "memory.ram_gib", num, where)),
        ram_budget_gib=float(_get(data, "memory.ram_budget_gib", num, where)),
        storage_budget_gib=float(data.get("memory", {}).get("storage_budget_gib", float("inf"))),
        gflops=float(_get(data, "compute.gflops", num, where)),
        gflops_source=_get(data, "compute.gflops_source", str, where),
        efficiency=eff, efficiency_source=_get(data, "efficiency.source", str, where),
        prefill_efficiency=float(efficiency.get("prefill", 0.5)),
        preferred=preferred, overhead_mib=float(data.get("runtime", {}).get("overhead_mib", 64)), path=path)
    if profile.threads < 1 or profile.bandwidth_gbps <= 0 or profile.gflops <= 0:
        raise FlexiEdgeError(f"{where}: threads, memory.bandwidth_gbps and compute.gflops must be positive")
    return profile


def read_profile_file(path: Path) -> DeviceProfile:
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise FlexiEdgeError(f"{path}: malformed TOML ({e})") from None
    except OSError as e:
        raise FlexiEdgeError(f"{path}: cannot read ({e.strerror})") from None
    return parse_profile(data, str(path), Path(path))


def profile_dirs(profiles_dir: Path | None = None) -> list[Path]:
    """Where names are looked up: the user's folder first (it may override a built-in), then the built-ins."""
    return ([Path(profiles_dir)] if profiles_dir else []) + [BUILTIN_DIR]


def known_profiles(profiles_dir: Path | None = None) -> list[str]:
    names = {p.stem for d in profile_dirs(profiles_dir) if d.is_dir() for p in d.glob("*.toml")}
    return sorted(names)


def load_profile(name_or_path: str, profiles_dir: Path | None = None) -> DeviceProfile:
    """A profile by name (NAME.toml in --profiles-dir, then built-in) or by path to a .toml file."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return read_profile_file(Path(name_or_path))
    for folder in profile_dirs(profiles_dir):
        if (folder / f"{name_or_path}.toml").is_file():
            return read_profile_file(folder / f"{name_or_path}.toml")
    raise FlexiEdgeError(f"unknown device profile {name_or_path!r}: known profiles are "
                         f"{', '.join(known_profiles(profiles_dir))} (or give a path to a .toml file)")


def load_profiles(names: list[str], profiles_dir: Path | None = None) -> list[DeviceProfile]:
    """Several profiles; "all" expands to every known one."""
    if "all" in names:
        names = known_profiles(profiles_dir)
    return [load_profile(n, profiles_dir) for n in names]
