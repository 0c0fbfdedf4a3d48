"""The one-command pipeline: load -> score -> prune/share -> recover -> export -> verify -> profile -> package.

    flexiedge pipeline --out runs/pipeline-smollm2 --archive zip   # built-in model, defaults sized for a laptop CPU
    flexiedge pipeline MODEL --ratio 0.3 --recover-tokens 4096 --targets gguf,onnx --device phone-snapdragon-8gen3 rpi5 --out DIR

Every stage writes its artifact under DIR and a record DIR/stages/NAME.json (flexiedge/stages.py). What
each stage's key holds, and so what reruns when a setting changes:

| stage            | settings in its key                          | inputs in its key            | artifact            |
|------------------|----------------------------------------------|------------------------------|---------------------|
| load             | model spec                                   | source files (name/size/mtime) | source.json       |
| score            | calibration (texts, tokens, seq_len, batch)  | load                         | scores.json         |
| prune            | PruneConfig (ratio, blocks, rank, ...)       | load, score                  | pruned/             |
| recover          | TrainConfig (tokens, recipe, ...)            | prune                        | recovered/          |
| export-T         | export type / precision                      | recover (or prune if 0 tok.) | exports/T/          |
| verify-T         | eval text, tokens, context                   | export-T                     | verify-T.json       |
| profile-T        | prompt / generated tokens                    | export-T                     | profile-T.json      |
| package-T[-DEV]  | device, archive, runtime settings            | export-T, verify-T, profile-T | bundles/T[-DEV]/   |

So the same command again skips every stage; a new --ratio keeps the cached Block Influence scores (they
depend only on the calibration settings) and reruns prune and everything after it; new calibration
settings rerun from score on; a new --recover-tokens reruns from recover on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import bundle_targets as bt
from .errors import FlexiEdgeError
from .models import DEFAULT_MODEL, file_sha256
from .plan import PruneConfig
from .prune import CalibrationConfig
from .stages import StageRunner, json_fingerprint
from .train_config import TrainConfig


@dataclass
class EvalSettings:
    texts: tuple[str, ...] = ("alice29",)  # held out: disjoint from calibration and training text
    tokens: int = 1024                     # scored tokens (short, so the pipeline stays fast)
    context: int = 256
    generate_tokens: int = 16
    prompt: str = "Once upon a time"


@dataclass
class ProfileSettings:
    prompt_tokens: int = 64
    gen_tokens: int = 32
    threads: int | None = None             # None: this host's cores (at most 8)


@dataclass
class PipelineConfig:
    model: str = DEFAULT_MODEL
    prune: PruneConfig = field(default_factory=PruneConfig)
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(tokens=2048))
    # Short sequences give a short budget several optimizer steps: one step at the full lr only hurts.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(tokens=4096, seq_len=128, eval_sequences=4))
    targets: tuple[str, ...] = ("gguf", "onnx")
    devices: tuple[str, ...] = ()
    export: bt.ExportSettings = field(default_factory=bt.ExportSettings)
    runtime: bt.RuntimeSettings = field(default_factory=bt.RuntimeSettings)
    archive: str | None = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    profile: ProfileSettings = field(default_factory=ProfileSettings)

    @property
    def recover(self) -> bool:
        return self.train.tokens > 0

    def check(self) -> None:
        for t in self.targets:
            bt.check_target(t)
        if not self.targets:
            raise FlexiEdgeError("--targets is empty: give gguf, onnx or gguf,onnx")
        self.prune.check()
        if self.recover:
            self.train.check()


@dataclass
class Pipeline:
    """Holds the loaded source model between score and prune (one load per process)."""
    config: PipelineConfig
    root: Path
    runner: StageRunner
    _loaded: tuple | None = None

    def source_model(self, folder: str):
        from .models import load_model
        if self._loaded is None:
            self._loaded = load_model(folder)
        return self._loaded


def run_pipeline(config: PipelineConfig, out: Path, log=print) -> dict:
    """Run (or resume) every stage under `out`; return the summary (also written to OUT/summary.json)."""
    config.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_target = 3 + max(1, len(config.devices))
    p = Pipeline(config, out, StageRunner(out, 4 + per_target * len(config.targets), log))
    source = stage_load(p)
    scores = stage_score(p, source)
    pruned = stage_prune(p, source, scores)
    final = stage_recover(p, pruned)
    rows = []
    for target in config.targets:
        rows += target_stages(p, target, source, final)
    summary = dict(out=str(out), stages=[dict(stage=n, status=s, seconds=round(t, 2)) for n, s, t in p.runner.done],
                   bundles=rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(summary_table(rows))
    return summary


# --- the stages ----------------------------------------------------------------------------------------

def stage_load(p: Pipeline) -> dict:
    from .models import resolve_model_dir
    folder = resolve_model_dir(p.config.model)
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()}

    def run(artifact: Path, resume: bool) -> dict:
        from .bundle_source import source_info
        info = source_info(dict(source_model=p.config.model, source_folder=str(folder)))
        info["folder"] = str(folder)
        artifact.write_text(json.dumps(info, indent=2) + "\n")
        return dict(info, fingerprint=info.get("sha256") or json_fingerprint(files))
    return p.runner.run("load", dict(model=p.config.model), dict(files=files), p.root / "source.json", run)


def stage_score(p: Pipeline, source: dict) -> dict:
    from .prune import score_blocks
    calibration = p.config.calibration

    def run(artifact: Path, resume: bool) -> dict:
        model, tokenizer = p.source_model(source["folder"])
        scores, calib = score_blocks(model, tokenizer, calibration)
        artifact.write_text(json.dumps(dict(block_influence=scores, calibration=calib), indent=2) + "\n")
        return dict(block_influence=scores, calibration=calib, fingerprint=file_sha256(artifact))
    return p.runner.run("score", _plain(calibration), dict(source=source["fingerprint"]), p.root / "scores.json", run)


def stage_prune(p: Pipeline, source: dict, scores: dict) -> dict:
    from .models import check_architecture
    from .prune import calibration_windows, check_rank, prune_scored
    config = p.config.prune

    def run(artifact: Path, resume: bool) -> dict:
        model_config = check_architecture(Path(source["folder"]))
        config.num_to_prune(model_config["num_hidden_layers"])
        check_rank(model_config, config)
        model, tokenizer = p.source_model(source["folder"])
        p._loaded = None  # the model is changed in place into the pruned stack: never reuse it
        parameters = sum(t.numel() for t in model.parameters())
        provenance = dict(source_model=p.config.model, source_folder=source["folder"],
                          source_parameters=parameters, calibration=scores["calibration"])
        windows = calibration_windows(tokenizer, p.config.calibration)  # the functional base choice reads them
        prune_scored(model, tokenizer, scores["block_influence"], windows, config, artifact, provenance, overwrite=True)
        return _run_result(artifact)
    inputs = dict(source=source["fingerprint"], scores=scores["fingerprint"])
    return p.runner.run("prune", _plain(config), inputs, p.root / "pruned", run)


def stage_recover(p: Pipeline, pruned: dict) -> dict:
    config = p.config.train
    if not p.config.recover:
        return p.runner.run("recover", dict(tokens=0), dict(model=pruned["fingerprint"]), None,
                            lambda artifact, resume: dict(pruned, skipped="--recover-tokens 0"))

    def run(artifact: Path, resume: bool) -> dict:
        from .recover import recover
        recover(Path(pruned["path"]), artifact, config, resume=resume, overwrite=True)
        return _run_result(artifact)
    return p.runner.run("recover", config.to_json(), dict(model=pruned["fingerprint"]), p.root / "recovered", run)


def target_stages(p: Pipeline, target: str, source: dict, final: dict) -> list[dict]:
    exported = stage_export(p, target, final)
    checked = stage_verify(p, target, exported)
    timed = stage_profile(p, target, exported)
    return [stage_package(p, target, device, source, final, exported, checked, timed)
            for device in (p.config.devices or (None,))]


def stage_export(p: Pipeline, target: str, final: dict) -> dict:
    settings = dict(p.config.export.for_target(target), verify=p.config.export.verify)

    def run(artifact: Path, resume: bool) -> dict:
        report = bt.export(target, Path(final["path"]), artifact, p.config.export, overwrite=True)
        hashes = export_hashes(target, artifact)
        return dict(path=str(artifact), files=hashes, storage=report.get("storage"), fingerprint=json_fingerprint(hashes))
    return p.runner.run(f"export-{target}", settings, dict(model=final["fingerprint"]), p.root / "exports" / target, run)


def export_hashes(target: str, folder: Path) -> dict[str, str]:
    """sha256 of each model file of an export (what must be byte-identical across identical exports)."""
    return {name: file_sha256(folder / name) for name in bt.model_files(target, folder)}


def stage_verify(p: Pipeline, target: str, exported: dict) -> dict:
    ev = p.config.eval

    def run(artifact: Path, resume: bool) -> dict:
        result = runtime_quality(target, Path(exported["path"]), ev, p.config.profile.threads)
        artifact.write_text(json.dumps(result, indent=2) + "\n")
        return dict(result, fingerprint=file_sha256(artifact))
    return p.runner.run(f"verify-{target}", _plain(ev), dict(export=exported["fingerprint"]),
                        p.root / f"verify-{target}.json", run)


def runtime_quality(target: str, folder: Path, ev: EvalSettings, threads: int | None) -> dict:
    """Held-out perplexity and a short greedy generation, in the target's runtime."""
    from transformers import AutoTokenizer
    from .data import text_provenance, tokenize_texts
    from .package import _host_threads

    tokenizer = AutoTokenizer.from_pretrained(folder if target == "onnx" else _run_of(folder), local_files_only=True)
    ids = tokenize_texts(tokenizer, ev.texts)[: ev.tokens + 1]
    with bt.load_export(target, folder, threads or _host_threads(), n_ctx=max(ev.context, 256)) as model:
        ppl = model.score(ids.tolist(), context=ev.context)
        text = model.generate(ev.prompt, ev.generate_tokens).text
    return dict(ppl=ppl.ppl, tokens=ppl.tokens, context=ev.context, texts=text_provenance(ev.texts),
                prompt=ev.prompt, generated=text)


def _run_of(export_folder: Path) -> Path:
    """The run an export was made from (its report names it): the GGUF export carries no tokenizer files."""
    report = json.loads((export_folder / bt.EXPORT_REPORT).read_text())
    return Path(report.get("run") or report["source"])


def stage_profile(p: Pipeline, target: str, exported: dict) -> dict:
    pr = p.config.profile

    def run(artifact: Path, resume: bool) -> dict:
        from .package import _host_threads
        threads = pr.threads or _host_threads()
        with bt.load_export(target, Path(exported["path"]), threads, n_ctx=pr.prompt_tokens + pr.gen_tokens + 8) as model:
            model.time(8, 4)  # warm-up
            result = dict(model.time(pr.prompt_tokens, pr.gen_tokens), threads=threads, host=_host())
        artifact.write_text(json.dumps(result, indent=2) + "\n")
        return dict(result, fingerprint=file_sha256(artifact))
    return p.runner.run(f"profile-{target}", _plain(pr), dict(export=exported["fingerprint"]),
                        p.root / f"profile-{target}.json", run)


def stage_package(p: Pipeline, target: str, device: str | None, source: dict, final: dict, exported: dict,
                  checked: dict, timed: dict) -> dict:
    from .package import PackageConfig, package, verify_bundle
    name = target if device is None else f"{target}-{device}"
    settings = dict(device=device, archive=p.config.archive, runtime=_plain(p.config.runtime))
    inputs = dict(export=exported["fingerprint"], verify=checked["fingerprint"], profile=timed["fingerprint"])
    figures = dict(heldout_ppl=checked["ppl"], heldout_tokens=checked["tokens"], ttft_s=timed["ttft_s"],
                   prefill_tok_per_s=timed["prefill_tps"], decode_tok_per_s=timed["decode_tps"],
                   measured_threads=timed["threads"], measured_on=timed["host"])

    def run(artifact: Path, resume: bool) -> dict:
        config = PackageConfig(target=target, device=device, archive=p.config.archive, export=p.config.export,
                               runtime=p.config.runtime)
        src = {k: v for k, v in source.items() if k not in ("fingerprint", "folder")}
        result = package(Path(final["path"]), artifact, config, export_dir=Path(exported["path"]),
                         figures=figures, source=src, overwrite=True)
        checked_bundle = verify_bundle(result.archive or artifact)
        bundle_bytes = sum(f["bytes"] for f in result.manifest["files"])
        return dict(bundle=str(artifact), archive=str(result.archive) if result.archive else None,
                    bundle_bytes=bundle_bytes, verify_seconds=checked_bundle.seconds, verified=True,
                    fingerprint=file_sha256(artifact / "manifest.json"))
    result = p.runner.run(f"package-{name}", settings, inputs, p.root / "bundles" / name, run)
    return dict(target=target, device=device or "-", **figures, **{k: v for k, v in result.items() if k != "fingerprint"})


# --- summary ---------------------------------------------------------------------------------------------

def summary_table(rows: list[dict]) -> str:
    head = ["target", "device", "bundle MiB", "held-out PPL", "TTFT s", "prefill tok/s", "decode tok/s", "verified"]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["target"], r["device"], f"{r['bundle_bytes'] / 2**20:.1f}", f"{r['heldout_ppl']:.2f}",
                 f"{r['ttft_s']:.3f}", f"{r['prefill_tok_per_s']:.0f}", f"{r['decode_tok_per_s']:.1f}",
                 "yes" if r.get("verified") else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"bundle: {r['archive'] or r['bundle']}" for r in rows]
    return "\n".join(lines)


def _run_result(folder: Path) -> dict:
    return dict(path=str(folder), fingerprint=file_sha256(folder / "flexiedge.json"))


def _plain(obj) -> dict:
    return json.loads(json.dumps(asdict(obj), default=str))


def _host() -> str:
    import os
    import platform
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


# --- command line ----------------------------------------------------------------------------------------

def add_commands(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="prune, recover, export, verify, profile and package in one resumable run")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF folder, .gguf file or built-in name")
    p.add_argument("--out", required=True, help="pipeline folder (rerun with the same --out to resume / skip)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of blocks to prune (default 0.3)")
    p.add_argument("--blocks", type=int, help="number of blocks to prune (overrides --ratio)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank per slot projection (default 32)")
    p.add_argument("--calib", nargs="+", help="calibration texts (default lcet10)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens for Block Influence (default 2048)")
    p.add_argument("--recover-tokens", type=int, default=4096, help="recovery budget in tokens (steps of 4 x 128 tokens); 0 skips recovery")
    p.add_argument("--recipe", default=None, help="recovery recipe: flexiedge (default) or paper")
    p.add_argument("--targets", default="gguf,onnx", help="comma-separated: gguf, onnx (default both)")
    p.add_argument("--device", nargs="+", default=[], help="device profile names: one bundle per target and device")
    p.add_argument("--archive", choices=("zip", "tar"), help="also write each bundle as .zip or .tar")
    p.add_argument("--gguf-type", default="f16", help="f32 | f16 | q8_0 | q4_k (default f16)")
    p.add_argument("--onnx-precision", default="fp32", help="fp32 | fp16 | int8 | int4 (default fp32)")
    p.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens scored per target (default 1024)")
    p.set_defaults(func=_pipeline)


def _pipeline(args) -> None:
    from .train_config import config_from
    calib = CalibrationConfig(tokens=args.calib_tokens, **({"texts": tuple(args.calib)} if args.calib else {}))
    train = (config_from(tokens=args.recover_tokens, recipe=args.recipe, eval_sequences=4, seq_len=128)
             if args.recover_tokens > 0 else TrainConfig(tokens=0))
    config = PipelineConfig(model=args.model, prune=PruneConfig(ratio=args.ratio, blocks=args.blocks, rank=args.rank),
                            calibration=calib, train=train, archive=args.archive,
                            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                            devices=tuple(args.device),
                            export=bt.ExportSettings(gguf_type=args.gguf_type, onnx_precision=args.onnx_precision),
                            eval=EvalSettings(tokens=args.eval_tokens))
    run_pipeline(config, Path(args.out))
