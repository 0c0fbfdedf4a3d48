"""App bundles: one folder (optionally a .zip/.tar) with everything an app needs to run a pruned model.

    flexiedge package runs/smollm2-30 --target gguf --device phone-snapdragon-8gen3 --out bundles/smollm2-30-gguf --archive zip
    flexiedge verify bundles/smollm2-30-gguf.zip      # every hash and size, then load + a short generation
    flexiedge run bundles/smollm2-30-gguf "Once upon a time"

    BUNDLE/
      model.gguf + adapters.gguf + llama_params.json      (--target gguf: compact layout, patched llama.cpp)
      model.onnx + model.onnx.data + genai_config.json    (--target onnx)
      tokenizer.json, tokenizer_config.json, ...
      flexiedge-export.json   the exporter's report (sizes, verify results)
      README.md               model card: source, licence, method, measured quality / storage / latency
      manifest.json           format, source model + hash, method settings, slot map, unique parameters,
                              device figures, licence, and sha256 + bytes of every other file

`verify` fails (exit 2) with one line naming the first file that is missing, extra, or does not match.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import bundle_targets as targets
from .bundle_card import model_card
from .bundle_files import ARCHIVES, archive_kind, check_suffix, list_files, record, unpack, write_archive
from .bundle_source import device_profile, source_info
from .cache import atomic_dir
from .errors import FlexiEdgeError

FORMAT, FORMAT_VERSION = "flexiedge-bundle", 1
MANIFEST, CARD = "manifest.json", "README.md"
VERIFY_PROMPT = "Once upon a time"


@dataclass
class PackageConfig:
    """How to package. Fields map one-to-one onto `flexiedge package` options."""
    target: str = "gguf"                 # gguf | onnx
    device: str | None = None            # device profile name (devices/profiles/NAME.toml)
    archive: str | None = None           # None | zip | tar: also write BUNDLE.zip / BUNDLE.tar
    export: targets.ExportSettings = field(default_factory=targets.ExportSettings)
    runtime: targets.RuntimeSettings = field(default_factory=targets.RuntimeSettings)

    def check(self) -> None:
        targets.check_target(self.target)
        if self.archive is not None and self.archive not in ARCHIVES:
            raise FlexiEdgeError(f"unknown --archive {self.archive!r}: use one of {', '.join(ARCHIVES)}")


@dataclass
class PackageResult:
    bundle: Path
    archive: Path | None
    manifest: dict


def package(run_dir: Path, out: Path, config: PackageConfig, export_dir: Path | None = None,
            figures: dict | None = None, source: dict | None = None, overwrite: bool = False) -> PackageResult:
    """Write bundle `out` from `run_dir` (exported here unless `export_dir` holds the export already).

    `figures`: measured quality / latency to put in the model card and manifest (the pipeline passes its
    own); `source`: the source model's identity if already known (else read from the run's provenance).
    """
    config.check()
    run_dir, out = Path(run_dir), Path(out)
    device_profile(config.device)  # an unknown device fails here, before the export
    with atomic_dir(out, overwrite=overwrite) as tmp, _export_folder(export_dir, tmp) as export_folder:
        if export_dir is None:
            targets.export(config.target, run_dir, export_folder, config.export)
        device = device_profile(config.device, export_folder)
        targets.copy_files(export_folder, run_dir, config.target, tmp)
        context = json.loads((run_dir / "config.json").read_text()).get("max_position_embeddings")
        runtime_file = targets.write_runtime_config(config.target, tmp, config.runtime, device.get("threads"), context)
        manifest = build_manifest(run_dir, tmp, config, device, figures or {}, source, runtime_file)
        (tmp / CARD).write_text(model_card(manifest))
        manifest["files"] = [record(tmp, rel).as_dict() for rel in list_files(tmp)]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    archive = None
    if config.archive:
        archive = write_archive(out, out.with_name(f"{out.name}.{config.archive}"), config.archive)
    return PackageResult(out, archive, manifest)


@contextlib.contextmanager
def _export_folder(export_dir: Path | None, tmp: Path):
    if export_dir is not None:
        yield Path(export_dir)
        return
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=tmp.name + "-export-") as work:
        yield Path(work) / "export"


def build_manifest(run_dir: Path, bundle: Path, config: PackageConfig, device: dict, figures: dict,
                   source: dict | None, runtime_file: str) -> dict:
    from .checkpoint import read_metadata
    import flexiedge

    meta = read_metadata(run_dir)
    prov, plan = meta.get("provenance", {}), meta["plan"]
    report = json.loads((bundle / targets.EXPORT_REPORT).read_text()) if (bundle / targets.EXPORT_REPORT).is_file() else {}
    src = dict(source or source_info(prov))
    src["parameters"] = src.get("parameters") or prov.get("source_parameters")
    return dict(
        format=FORMAT, format_version=FORMAT_VERSION, flexiedge=flexiedge.__version__,
        target=config.target, runtime=dict(name="llama.cpp" if config.target == "gguf" else "onnxruntime",
                                           config_file=runtime_file),
        source=src, licence=src.get("licence", "unknown"),
        run=dict(weights_sha256=meta["weights"]["sha256"], parameters=meta["parameters"]),
        method=dict(name=plan["method"], settings=plan.get("config", {}), pruned_blocks=plan["pruned"],
                    output_norm=plan.get("output_norm"), calibration=prov.get("calibration"),
                    recovery=_recovery_summary(prov.get("recovery"))),
        slot_map={str(p): layer["shares"] for p, layer in enumerate(plan["layers"]) if layer["shares"] is not None},
        unique_parameters=_unique_parameters(report, meta),
        export=dict(settings=report.get("config", config.export.for_target(config.target)),
                    storage=report.get("storage"), verify=report.get("verify")),
        device=device, figures=figures)


def _unique_parameters(report: dict, meta: dict) -> int:
    storage = report.get("storage") or {}
    return int(storage.get("unique_params") or storage.get("unique_parameters") or meta["parameters"]["stored"])


def _recovery_summary(recovery: dict | None) -> dict | None:
    if not recovery:
        return None
    config = recovery.get("config", {})
    return dict(tokens=config.get("tokens"), recipe=config.get("recipe"), lr=config.get("lr"),
                seq_len=config.get("seq_len"), data=recovery.get("data"), steps=recovery.get("total_steps"))


# --- verify and run ------------------------------------------------------------------------------------

@dataclass
class VerifyResult:
    bundle: str
    files: int
    bytes: int
    hash_seconds: float
    load_seconds: float
    generated: str
    seconds: float


@contextlib.contextmanager
def open_bundle(path: Path):
    """Yield the bundle folder: `path` itself, or an archive unpacked (safely) into a temporary folder."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise FlexiEdgeError(f"{path} not found: give a bundle folder or a .zip/.tar bundle archive")
    if archive_kind(path) is None:
        raise FlexiEdgeError(f"{path} is neither a bundle folder nor a readable .zip/.tar archive")
    with tempfile.TemporaryDirectory(prefix="flexiedge-bundle-") as tmp:
        yield unpack(path, Path(tmp))


def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise FlexiEdgeError(f"{bundle} has no {MANIFEST}: it is not a flexiedge bundle")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexiEdgeError(f"{MANIFEST} is corrupt ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise FlexiEdgeError(f"{MANIFEST}: unsupported format {manifest.get('format')} v{manifest.get('format_version')}")
    return manifest


def check_files(bundle: Path, manifest: dict) -> tuple[int, int]:
    """Every listed file present with its size and sha256, and nothing else; raises at the first mismatch."""
    listed = {f["path"]: f for f in manifest["files"]}
    for rel, want in listed.items():
        check_suffix(Path(rel))
        path = bundle / rel
        if not path.is_file():
            raise FlexiEdgeError(f"{rel}: missing from the bundle")
        got = record(bundle, rel) if path.stat().st_size == want["bytes"] else None
        if got is None:
            raise FlexiEdgeError(f"{rel}: size {path.stat().st_size} bytes, manifest says {want['bytes']}")
        if got.sha256 != want["sha256"]:
            raise FlexiEdgeError(f"{rel}: sha256 {got.sha256[:16]}... does not match the manifest's {want['sha256'][:16]}...")
    extra = [rel for rel in list_files(bundle) if rel not in listed and rel != MANIFEST]
    if extra:
        raise FlexiEdgeError(f"{extra[0]}: not listed in {MANIFEST} (unexpected file in the bundle)")
    return len(listed), sum(f["bytes"] for f in listed.values())


def verify_bundle(path: Path, max_new_tokens: int = 8, threads: int | None = None) -> VerifyResult:
    """Hashes and sizes of every file, then load in the bundle's runtime and generate a few tokens."""
    t0 = time.perf_counter()
    with open_bundle(path) as bundle:
        manifest = read_manifest(bundle)
        n, size = check_files(bundle, manifest)
        t1 = time.perf_counter()
        with targets.load(manifest["target"], bundle, threads or _host_threads()) as model:
            t2 = time.perf_counter()
            text = model.generate(VERIFY_PROMPT, max_new_tokens, stop_at_eos=False).text
    if not text.strip() and max_new_tokens:
        raise FlexiEdgeError(f"{path}: the model loaded but generated no text")
    done = time.perf_counter()
    return VerifyResult(str(path), n, size, t1 - t0, t2 - t1, text, done - t0)


def run_bundle(path: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
               threads: int | None = None, stream=None) -> str:
    """Generate from a bundle, streaming each piece to `stream` (default: standard output)."""
    stream = stream or sys.stdout
    with open_bundle(path) as bundle:
        manifest = read_manifest(bundle)
        with targets.load(manifest["target"], bundle, threads or _host_threads()) as model:
            def show(_token, piece):
                stream.write(piece)
                stream.flush()
            result = model.generate(prompt, max_new_tokens, temperature=temperature, seed=seed, on_token=show)
    stream.write("\n")
    return result.text


def _host_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


# --- command line ----------------------------------------------------------------------------------------

def add_commands(subparsers) -> None:
    p = subparsers.add_parser("package", help="bundle a run for an app: model files, runtime config, manifest, card")
    p.add_argument("run", help="run folder (flexiedge prune / recover)")
    p.add_argument("--target", required=True, choices=targets.TARGETS)
    p.add_argument("--device", help="device profile name (devices/profiles/NAME.toml; see `flexiedge profile`)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--archive", choices=ARCHIVES, help="also write OUT.zip or OUT.tar")
    p.add_argument("--gguf-type", default="f16", help="gguf: f32 | f16 | q8_0 | q4_k")
    p.add_argument("--onnx-precision", default="fp32", help="onnx: fp32 | fp16 | int8 | int4")
    p.add_argument("--n-ctx", type=int, default=2048, help="gguf: context length in llama_params.json")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_package)

    p = subparsers.add_parser("verify", help="check a bundle: every hash and size, load, short generation")
    p.add_argument("bundle", help="bundle folder or .zip/.tar archive")
    p.add_argument("--tokens", type=int, default=8, help="tokens to generate (default 8)")
    p.set_defaults(func=_verify)

    p = subparsers.add_parser("run", help="generate from a bundle with its runtime, streaming")
    p.add_argument("bundle", help="bundle folder or .zip/.tar archive")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=_run)


def _package(args) -> None:
    config = PackageConfig(target=args.target, device=args.device, archive=args.archive,
                           export=targets.ExportSettings(gguf_type=args.gguf_type, onnx_precision=args.onnx_precision),
                           runtime=targets.RuntimeSettings(n_ctx=args.n_ctx))
    result = package(Path(args.run), Path(args.out), config, overwrite=args.force)
    size = sum(f["bytes"] for f in result.manifest["files"])
    print(f"wrote {result.bundle} ({len(result.manifest['files'])} files, {size / 2**20:.1f} MiB)"
          + (f" and {result.archive}" if result.archive else ""))


def _verify(args) -> None:
    r = verify_bundle(Path(args.bundle), args.tokens)
    print(f"ok: {r.bundle}: {r.files} files, {r.bytes / 2**20:.1f} MiB match the manifest; loaded in "
          f"{r.load_seconds:.1f} s; generated {r.generated!r} ({r.seconds:.1f} s in all)")


def _run(args) -> None:
    run_bundle(Path(args.bundle), args.prompt, args.max_new_tokens, args.temperature, args.seed, args.threads)
