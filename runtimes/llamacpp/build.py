"""Build and install the patched llama.cpp Python runtime (llama-cpp-python + flexiedge-llama.patch).

    python -m flexiedge.runtimes.llamacpp.build           # no-op when the patched build is installed
    python -m flexiedge.runtimes.llamacpp.build --force   # rebuild the wheel and reinstall

Downloads the llama-cpp-python sdist, applies `flexiedge-llama.patch` to its vendored llama.cpp (GGUF
tensor aliases, optional output norms in the `llama` arch), builds a wheel once (about 9 minutes on 2
cores) into $FLEXIEDGE_CACHE/llamacpp/wheels/<cpu>/ and pip-installs it. The wheel's version carries
the patch's hash, "0.3.36+flexiedge.<sha8>", which is how `ensure_runtime()` knows there is nothing to do.
llama.cpp is built for the native CPU (GGML_NATIVE), so the cached wheel is keyed by the CPU's features.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flexiedge.cache import cache_dir
from flexiedge.errors import FlexiEdgeError

LLAMA_CPP_PYTHON = "0.3.36"
PATCH = Path(__file__).with_name("flexiedge-llama.patch")
# only the library: no llava/mtmd, tools, examples, tests or server (a 9 instead of ~37 minute build)
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF")


def patched_version() -> str:
    """The version the patched wheel is built with: a PEP 440 local label naming the patch."""
    return f"{LLAMA_CPP_PYTHON}+flexiedge.{hashlib.sha256(PATCH.read_bytes()).hexdigest()[:8]}"


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class RuntimeStatus:
    ok: bool
    reason: str


def runtime_status() -> RuntimeStatus:
    """Whether `import llama_cpp` gives this patch's build (no import: that would load the library)."""
    have, want = installed_version(), patched_version()
    if have == want:
        return RuntimeStatus(True, f"llama-cpp-python {have}")
    what = "not installed" if have is None else f"{have} installed"
    return RuntimeStatus(False, f"patched llama.cpp runtime {want} missing ({what}): "
                                f"run python -m flexiedge.runtimes.llamacpp.build")


def cpu_key() -> str:
    """A short hash of the CPU's instruction-set flags: a natively built wheel only runs where they match."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += " " + " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def ensure_runtime(force: bool = False) -> str:
    """Install the patched llama-cpp-python unless it already is; return its version."""
    want = patched_version()
    if not force and installed_version() == want:
        return want
    wheels = cache_dir("llamacpp", "wheels", cpu_key())
    found = sorted(wheels.glob(f"llama_cpp_python-{want}-*.whl"))
    wheel = found[0] if found and not force else build_wheel(wheels)
    print(f"installing {wheel.name}", flush=True)
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)])
    _run([sys.executable, "-m", "pip", "install", "--quiet", str(wheel)])  # its few pure-Python dependencies
    if installed_version() != want:
        raise FlexiEdgeError(f"installed {wheel.name} but pip reports llama-cpp-python {installed_version()}")
    return want


def build_wheel(out_dir: Path) -> Path:
    """Download the sdist, patch it, build a wheel in a temporary folder and move it into out_dir."""
    root = cache_dir("llamacpp")
    sdist = download_sdist(root)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
        apply_patch(src)
        init = src / "llama_cpp" / "__init__.py"  # the wheel's version is read from here
        init.write_text(init.read_text().replace(f'__version__ = "{LLAMA_CPP_PYTHON}"', f'__version__ = "{patched_version()}"'))
        log = root / "build.log"
        print(f"building patched llama.cpp wheel (about 9 min on 2 cores, log: {log})", flush=True)
        t0 = time.time()
        env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        dist = Path(tmp) / "dist"
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(dist), str(src)], env=env, log=log)
        built = list(dist.glob("llama_cpp_python-*.whl"))
        if len(built) != 1:
            raise FlexiEdgeError(f"pip wheel produced {len(built)} wheels in {dist}, expected one (see {log})")
        final = out_dir / built[0].name
        shutil.move(built[0], out_dir / (final.name + ".tmp"))
        os.replace(out_dir / (final.name + ".tmp"), final)  # atomic: a half-copied wheel is never found
        print(f"built {final.name} in {time.time() - t0:.0f} s", flush=True)
        return final


def download_sdist(root: Path) -> Path:
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                  "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
            os.replace(Path(tmp) / sdist.name, sdist)
    return sdist


def apply_patch(src: Path) -> None:
    """Apply the patch with `patch -p1`, checking first so a mismatch leaves no half-patched tree."""
    if shutil.which("patch") is None:
        raise FlexiEdgeError("the `patch` program is needed to build the llama.cpp runtime: install it (e.g. apt-get install patch)")
    for check in (["--dry-run"], []):
        r = subprocess.run(["patch", "-p1", "--batch", "--forward", *check, "-i", str(PATCH)], cwd=src,
                           capture_output=True, text=True)
        if r.returncode != 0:
            first = (r.stdout + r.stderr).strip().splitlines()[:1]
            raise FlexiEdgeError(f"{PATCH.name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON}: {' '.join(first)}")


def _run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> None:
    """Run a command at low priority; with `log`, keep its output there and show ninja's [i/n] progress."""
    nice = (lambda: os.nice(10)) if hasattr(os, "nice") else None
    if log is None:
        r = subprocess.run(cmd, env=env, preexec_fn=nice, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:]
            raise FlexiEdgeError(f"{' '.join(cmd[2:4])} failed: {' '.join(tail)}")
        return
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, preexec_fn=nice, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tty = sys.stdout.isatty()
        for line in p.stdout:
            f.write(line)
            m = re.match(r"\s*\[(\d+)/(\d+)\]", line)
            if m and (tty or int(m[1]) % 20 == 0 or m[1] == m[2]):  # a line per 20 steps in logs
                print(f"\r  compiling {m[1]}/{m[2]}", end="" if tty else "\n", flush=True)
        if tty:
            print(flush=True)
        if p.wait() != 0:
            raise FlexiEdgeError(f"building the llama.cpp wheel failed (exit {p.returncode}): see {log}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexiedge.runtimes.llamacpp.build", description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild the wheel and reinstall it")
    ap.add_argument("--check", action="store_true", help="only report whether the patched runtime is installed")
    args = ap.parse_args(argv)
    try:
        if args.check:
            s = runtime_status()
            print(s.reason)
            return 0 if s.ok else 1
        print(f"llama-cpp-python {ensure_runtime(force=args.force)} (patched) is installed")
        return 0
    except FlexiEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
