"""A bundle's files on disk: hashing, deterministic archives, and unpacking that cannot escape its folder.

Archives are written in a fixed order with fixed timestamps and permissions, so the same bundle gives the
same bytes. Unpacking reads each member as plain data into the target folder: absolute names, `..`,
links, devices and duplicate names are refused before anything is written, and nothing is executed.
Only data formats travel in a bundle (JSON, GGUF, ONNX and its external data, safetensors, text);
a pickle-capable file (.bin, .pt, .pkl ...) is refused by name.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import FlexiEdgeError
from .models import file_sha256

ARCHIVES = ("zip", "tar")
# Suffixes a bundle may hold: data only, nothing that unpickles or executes.
ALLOWED_SUFFIXES = (".json", ".gguf", ".onnx", ".data", ".safetensors", ".md", ".txt", ".jinja")
FIXED_MTIME = (1980, 1, 1, 0, 0, 0)   # zip's earliest date; tar gets the matching epoch second
FIXED_EPOCH = 315532800


@dataclass(frozen=True)
class FileRecord:
    path: str      # POSIX path relative to the bundle folder
    sha256: str
    bytes: int

    def as_dict(self) -> dict:
        return dict(path=self.path, sha256=self.sha256, bytes=self.bytes)


def check_member_name(name: str) -> str:
    """A safe relative POSIX path, or FlexiEdgeError naming the entry."""
    path = PurePosixPath(name)
    if not name or name.startswith(("/", "\\")) or "\\" in name or path.is_absolute() or ":" in path.parts[0]:
        raise FlexiEdgeError(f"archive entry {name!r} has an absolute path: refusing to unpack")
    if any(part in ("..", "") for part in name.rstrip("/").split("/")):
        raise FlexiEdgeError(f"archive entry {name!r} points outside the bundle ('..'): refusing to unpack")
    check_suffix(path)
    return str(path)


def check_suffix(path: PurePosixPath | Path) -> None:
    if path.suffix.lower() not in ALLOWED_SUFFIXES:
        raise FlexiEdgeError(f"{path} is not an allowed bundle file (only {' '.join(ALLOWED_SUFFIXES)}): "
                             "bundles carry data formats only")


def record(folder: Path, rel: str) -> FileRecord:
    path = folder / rel
    return FileRecord(rel, file_sha256(path), path.stat().st_size)


def list_files(folder: Path) -> list[str]:
    """Every entry under `folder` as sorted relative paths; links and special files are refused."""
    out = []
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise FlexiEdgeError(f"{rel} in {folder} is a link or special file: bundles hold plain files only")
        if path.is_file():
            out.append(rel)
    return out


# --- writing archives -------------------------------------------------------------------------------------

def write_archive(folder: Path, out: Path, kind: str) -> Path:
    """`folder`'s files under a top folder named like `folder`, sorted, fixed times and modes."""
    if kind not in ARCHIVES:
        raise FlexiEdgeError(f"unknown --archive {kind!r}: use one of {', '.join(ARCHIVES)}")
    from .cache import atomic_file
    names = list_files(folder)
    with atomic_file(out) as tmp:
        (_write_zip if kind == "zip" else _write_tar)(folder, names, tmp)
    return out


def _write_zip(folder: Path, names: list[str], out: Path) -> None:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for rel in names:
            info = zipfile.ZipInfo(f"{folder.name}/{rel}", date_time=FIXED_MTIME)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            with open(folder / rel, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                while block := src.read(1 << 24):
                    dst.write(block)


def _write_tar(folder: Path, names: list[str], out: Path) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for rel in names:
            info = tarfile.TarInfo(f"{folder.name}/{rel}")
            info.size, info.mtime, info.mode = (folder / rel).stat().st_size, FIXED_EPOCH, 0o644
            with open(folder / rel, "rb") as src:
                tf.addfile(info, src)


# --- unpacking ----------------------------------------------------------------------------------------------

def archive_kind(path: Path) -> str | None:
    if path.suffix == ".zip" and zipfile.is_zipfile(path):
        return "zip"
    if path.suffix == ".tar" and tarfile.is_tarfile(path):
        return "tar"
    return None


def unpack(archive: Path, target: Path) -> Path:
    """Unpack `archive` into the empty folder `target`; return the bundle folder inside it."""
    kind = archive_kind(archive)
    if kind is None:
        raise FlexiEdgeError(f"{archive} is neither a bundle folder nor a readable .zip/.tar archive")
    members = (_zip_members if kind == "zip" else _tar_members)(archive)
    names = [name for name, _ in members]
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or any("/" not in n for n in names):
        raise FlexiEdgeError(f"{archive} must hold exactly one top folder (the bundle), found {sorted(tops)[:3]}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FlexiEdgeError(f"archive entry {dup!r} appears twice: refusing to unpack")
    for name, read in members:
        dest = target / name
        if target.resolve() not in dest.resolve().parents:
            raise FlexiEdgeError(f"archive entry {name!r} points outside the bundle: refusing to unpack")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as f:
            read(f)
    return target / tops.pop()


def _zip_members(archive: Path) -> list:
    zf = zipfile.ZipFile(archive)
    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if info.is_dir():
            check_member_name(info.filename.rstrip("/") + "/x.json")  # a folder: check its path only
            continue
        name = check_member_name(info.filename)
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: written without Unix file type bits
            raise FlexiEdgeError(f"archive entry {info.filename!r} is a link or special file: refusing to unpack")
        out.append((name, lambda f, i=info: _copy(zf.open(i), f)))
    return out


def _tar_members(archive: Path) -> list:
    tf = tarfile.open(archive)
    out = []
    for info in tf.getmembers():
        if info.isdir():
            check_member_name(info.name.rstrip("/") + "/x.json")
            continue
        name = check_member_name(info.name)
        if not info.isreg():
            raise FlexiEdgeError(f"archive entry {info.name!r} is a link or special file: refusing to unpack")
        out.append((name, lambda f, i=info: _copy(tf.extractfile(i), f)))
    return out


def _copy(src: io.BufferedIOBase, dst) -> None:
    with src:
        while block := src.read(1 << 24):
            dst.write(block)
