"""`flexiedge verify` on tiny bundles: passes on a good bundle (folder, zip, tar) and fails with one line
naming the first bad file or archive entry on each kind of damage (table-driven)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from flexiedge.cli import main
from flexiedge.errors import FlexiEdgeError
from flexiedge.package import verify_bundle


@pytest.mark.parametrize("archive", [None, "zip", "tar"])
def test_verify_passes_on_a_good_bundle(tiny_bundle, archive, capsys):
    path = tiny_bundle("gguf", archive)
    assert main(["verify", str(path), "--tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


# --- damage done to a copy of the bundle folder -----------------------------------------------------------

def _flip_byte(bundle: Path, name: str) -> None:
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0xFF                 # same size: only the hash can catch it
    (bundle / name).write_bytes(bytes(data))


FOLDER_DAMAGE = [
    # (case, damage, message fragment)
    ("flipped byte in the model", lambda b: _flip_byte(b, "model.gguf"), "model.gguf: sha256"),
    ("flipped byte in the adapters", lambda b: _flip_byte(b, "adapters.gguf"), "adapters.gguf: sha256"),
    ("flipped byte in the runtime config", lambda b: _flip_byte(b, "llama_params.json"), "llama_params.json: sha256"),
    ("missing model file", lambda b: (b / "model.gguf").unlink(), "model.gguf: missing"),
    ("missing tokenizer", lambda b: (b / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    ("truncated file", lambda b: (b / "adapters.gguf").write_bytes((b / "adapters.gguf").read_bytes()[:-1]),
     "adapters.gguf: size"),
    ("extra file", lambda b: (b / "notes.txt").write_text("hi"), "notes.txt: not listed"),
    ("missing manifest", lambda b: (b / "manifest.json").unlink(), "has no manifest.json"),
    ("corrupt manifest", lambda b: (b / "manifest.json").write_text("{"), "manifest.json is corrupt"),
    # a manifest edited to list a pickle is refused by name, before anything could load it
    ("pickle listed", lambda b: _list_extra(b, "weights.bin"), "weights.bin is not an allowed bundle file"),
]


def _list_extra(bundle: Path, name: str) -> None:
    (bundle / name).write_bytes(b"\x80\x04.")
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"].insert(0, dict(path=name, sha256="0" * 64, bytes=3))
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case,damage,message", FOLDER_DAMAGE, ids=[c[0] for c in FOLDER_DAMAGE])
def test_verify_fails_on_a_damaged_folder(tiny_bundle, tmp_path, capsys, case, damage, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("gguf"), bundle)
    damage(bundle)
    assert main(["verify", str(bundle)]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


# --- hostile archives: nothing may be written outside the target folder -----------------------------------

def _zip_with(good: Path, out: Path, name: str, data: bytes = b"{}", mode: int | None = None) -> Path:
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate name we add on purpose
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        extra = zipfile.ZipInfo(name)
        if mode is not None:
            extra.external_attr = mode << 16
        dst.writestr(extra, data)
    return out


def _tar_with(good: Path, out: Path, info: tarfile.TarInfo, data: bytes = b"{}") -> Path:
    with tarfile.open(good) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        info.size = len(data) if info.isreg() else 0
        dst.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def _tar_info(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


ARCHIVE_DAMAGE = [
    # (case, build(good_zip, good_tar, out_dir) -> archive, message fragment)
    ("zip ../ entry", lambda z, t, d: _zip_with(z, d / "b.zip", "gguf/../../evil.json"), "'..'"),
    ("zip leading ../", lambda z, t, d: _zip_with(z, d / "b.zip", "../evil.json"), "'..'"),
    ("zip absolute path", lambda z, t, d: _zip_with(z, d / "b.zip", "/tmp/evil.json"), "absolute path"),
    ("zip symlink", lambda z, t, d: _zip_with(z, d / "b.zip", "gguf/link.json", b"/etc/passwd", 0o120777),
     "link or special file"),
    ("zip pickle", lambda z, t, d: _zip_with(z, d / "b.zip", "gguf/evil.pkl", b"\x80\x04."), "not an allowed"),
    ("zip duplicate entry", lambda z, t, d: _zip_with(z, d / "b.zip", "gguf/model.gguf"), "appears twice"),
    ("tar ../ entry", lambda z, t, d: _tar_with(t, d / "b.tar", _tar_info("gguf/../../evil.json")), "'..'"),
    ("tar absolute path", lambda z, t, d: _tar_with(t, d / "b.tar", _tar_info("/tmp/evil.json")), "absolute path"),
    ("tar symlink", lambda z, t, d: _tar_with(t, d / "b.tar", _tar_info("gguf/l.json", tarfile.SYMTYPE, "/etc/passwd")),
     "link or special file"),
    ("tar hard link", lambda z, t, d: _tar_with(t, d / "b.tar", _tar_info("gguf/h.json", tarfile.LNKTYPE, "/etc/passwd")),
     "link or special file"),
    ("tar device", lambda z, t, d: _tar_with(t, d / "b.tar", _tar_info("gguf/dev.json", tarfile.CHRTYPE)),
     "link or special file"),
    ("tar flipped byte", lambda z, t, d: _flipped_tar(t, d / "b.tar"), "model.gguf: sha256"),
]


def _flipped_tar(good: Path, out: Path) -> Path:
    with tarfile.open(good) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith("model.gguf"):
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            dst.addfile(member, io.BytesIO(data))
    return out


@pytest.mark.parametrize("case,build,message", ARCHIVE_DAMAGE, ids=[c[0] for c in ARCHIVE_DAMAGE])
def test_verify_refuses_a_hostile_or_damaged_archive(tiny_bundle, tmp_path, capsys, case, build, message):
    archive = build(tiny_bundle("gguf", "zip"), tiny_bundle("gguf", "tar"), tmp_path)
    assert main(["verify", str(archive)]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path.parent / "evil.json").exists() and not Path("/tmp/evil.json").exists()


def test_unpacking_never_writes_outside_its_target(tiny_bundle, tmp_path):
    from flexiedge.bundle_files import unpack
    archive = _zip_with(tiny_bundle("gguf", "zip"), tmp_path / "b.zip", "gguf/../../escaped.json")
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    with pytest.raises(FlexiEdgeError, match="outside the bundle"):
        unpack(archive, target)
    assert list(target.iterdir()) == [] and not (tmp_path / "escaped.json").exists()


def test_verify_names_a_path_that_is_neither_folder_nor_archive(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(FlexiEdgeError, match="neither a bundle folder nor"):
        verify_bundle(tmp_path / "x.txt")
