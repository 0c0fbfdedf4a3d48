"""`flexiedge profile`: measure exports on this host and estimate them on device profiles.

    flexiedge profile runs/exports/devices/*-gguf-q8_0 --device host phone-snapdragon-8gen3 --out prof/
    flexiedge profile EXPORTS --device all --gen 32 --repeats 2        # quicker, every known profile
    flexiedge profile --llama7b --device all                           # the analytic LLaMA-2-7B at 30% only
"""

from __future__ import annotations

from pathlib import Path

from flexiedge.errors import FlexiEdgeError


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("profile", help="size, RSS, TTFT, prefill and decode t/s per device: "
                              "measured on this host, estimated elsewhere")
    p.add_argument("artifacts", nargs="*", help="export folders (flexiedge export gguf|onnx) or .gguf files")
    p.add_argument("--device", nargs="+", default=["host"], help="profile names, .toml paths or 'all' (default: host)")
    p.add_argument("--profiles-dir", type=Path, help="folder of your own NAME.toml profiles (searched first)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (pp128 style)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens (tg128 style)")
    p.add_argument("--n-ctx", type=int, default=512, help="context the KV cache is sized for in the RAM estimate")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="override the host profile's thread count")
    p.add_argument("--no-measure", action="store_true", help="estimate only, even for the host")
    p.add_argument("--llama7b", action="store_true", help="add the analytic LLaMA-2-7B (unpruned, ShortGPT and "
                   "FlexiGPT at 9/32 blocks, rank 256) in GGUF Q4_K and ONNX int4, estimated only")
    p.add_argument("--out", type=Path, help="write OUT/profile.json and OUT/profile.png")
    p.set_defaults(func=_profile)


def _profile(args) -> None:
    from dataclasses import replace

    from .analytic import llama7b_footprints
    from .estimate import Settings
    from .footprint import footprint
    from .profiler import MeasureConfig, estimated_row, profile_artifacts
    from .profiles import load_profiles
    from .report import plot, table, to_json

    if not args.artifacts and not args.llama7b:
        raise FlexiEdgeError("give export folders to profile, or --llama7b for the analytic 7B")
    profiles = load_profiles(args.device, args.profiles_dir)
    if args.no_measure:
        profiles = [replace(p, measured=False) for p in profiles]
    settings = Settings(prompt=args.prompt, gen=args.gen, n_ctx=args.n_ctx)
    config = MeasureConfig(repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    rows, bench = profile_artifacts([footprint(a) for a in args.artifacts], profiles, settings, config)
    if args.llama7b:  # too big to run here: every device, the host included, is an estimate
        rows += [estimated_row(fp, p, replace(settings, n_ctx=max(settings.n_ctx, 2048)))
                 for fp in llama7b_footprints() for p in profiles]
    if bench:
        print(f"host: copy bandwidth {bench.bandwidth_gbps:.2f} GB/s, fp32 matmul {bench.gflops:.1f} GFLOP/s "
              f"({bench.threads} threads)")
    print(table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        to_json(rows, bench, settings, args.out / "profile.json")
        plot(rows, args.out / "profile.png")
        print(f"wrote {args.out / 'profile.json'} and {args.out / 'profile.png'}")
