"""Facts a bundle records about where it came from and where it goes: source model, licence, device.

The licence is read, never guessed: the source folder's model card (README.md front matter `license:`),
its config.json, or the GGUF the built-in model was converted from (`general.license`); else "unknown".
Device figures come from flexiedge.devices: the profile (devices/profiles/NAME.toml) and the estimate of the
export's speed and memory on it (devices/estimate.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from .errors import FlexiEdgeError
from .models import file_sha256

def source_info(provenance: dict, weights_sha256: str | None = None) -> dict:
    """Name, folder, parameters, weights hash and licence of the unpruned model a run was pruned from."""
    folder = Path(provenance["source_folder"]) if provenance.get("source_folder") else None
    info = dict(model=provenance.get("source_model"), parameters=provenance.get("source_parameters"),
                sha256=weights_sha256, licence="unknown")
    if folder is None or not folder.is_dir():
        return info
    origin = _read_json(folder / "flexiedge-source.json")  # a converted GGUF: hash the original file
    if weights_sha256 is None:
        info["sha256"] = origin.get("sha256") or _hash_weights(folder)
    if origin.get("gguf"):
        info["converted_from"] = origin["gguf"]
    info["licence"] = licence_of(folder)
    return info


def licence_of(folder: Path) -> str:
    card = folder / "README.md"
    if card.is_file():
        match = re.search(r"^---\s*$.*?^licen[cs]e:\s*[\"']?([\w.\-+]+)", card.read_text(errors="replace"),
                          re.MULTILINE | re.DOTALL)
        if match:
            return match.group(1)
    config = _read_json(folder / "config.json")
    if config.get("license"):
        return str(config["license"])
    origin = _read_json(folder / "flexiedge-source.json")
    if origin.get("gguf"):
        return _gguf_licence(origin["gguf"])
    return "unknown"


def _gguf_licence(name: str) -> str:
    from .cache import cache_dir
    path = cache_dir("downloads") / name
    if not path.is_file():
        return "unknown"
    import gguf
    field = gguf.GGUFReader(path).fields.get("general.license")
    return str(field.contents()) if field is not None else "unknown"


def _hash_weights(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors"))
    return file_sha256(files[0]) if len(files) == 1 else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


# --- device profiles (devices/ owns the profiles, the footprint and the estimate) ----------------------------

def device_profile(name: str | None, export_dir: Path | None = None) -> dict:
    """The device's profile figures (and, given an export, its estimated speed and memory there)."""
    if name is None:
        return dict(name=None)
    try:
        from .devices.profiles import load_profile
    except ImportError:  # the device rooms are optional: without them, record the name only
        return dict(name=name, profile=None, note="device profiles not available in this install")
    profile = load_profile(name)  # a one-line error listing the known profiles
    data = {k: v for k, v in asdict(profile).items() if k != "path"}
    out = dict(name=profile.name, profile=json.loads(json.dumps(data, default=str)), threads=profile.threads)
    if export_dir is not None:
        out["estimate"] = _estimate(export_dir, profile)
    return out


def _estimate(export_dir: Path, profile) -> dict | None:
    from .devices.estimate import Settings, estimate
    from .devices.footprint import footprint
    result = estimate(footprint(export_dir), profile, Settings()).as_dict()
    return dict(result, settings=asdict(Settings()), note="estimated from the profile, not measured on the device")
