"""The profiler's outputs: a llama-bench style terminal table, JSON, and a storage-vs-latency plot."""

from __future__ import annotations

import json
from pathlib import Path

from .profiler import Row

MIB = 2**20
COLUMNS = ("model", "runtime", "type", "device", "size MiB", "RSS MiB", "TTFT s", "prefill t/s", "decode t/s", "source")


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.2f} ± {sd:.2f}" if sd else f"{mean:.2f}"


def row_cells(r: Row) -> list[str]:
    rss = f"{r.resident_bytes / MIB:.1f}" + ("" if r.fits is None or r.fits else " (over budget)")
    source = r.source + (f" ({r.decode_rel_error:+.0%} vs measured)" if r.decode_rel_error is not None else "")
    return [r.model, r.runtime, r.type, r.device, f"{r.size_bytes / MIB:.1f}", rss, _pm(r.ttft_s, r.ttft_sd),
            _pm(r.prefill_tps, r.prefill_sd), _pm(r.decode_tps, r.decode_sd), source]


def table(rows: list[Row]) -> str:
    """Markdown-style pipes, aligned: readable in a terminal and pasteable into the README."""
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def to_json(rows: list[Row], bench, settings, path: Path) -> None:
    doc = dict(settings=vars(settings), hostbench=bench.as_dict() if bench else None, rows=[r.as_dict() for r in rows])
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


METHOD_MARKERS = {"unpruned": "o", "shortgpt": "s", "flexigpt": "^"}


def plot(rows: list[Row], path: Path, title: str = "storage vs decode latency") -> None:
    """One panel per runtime: x = MiB on disk, y = ms per generated token; colour = device,
    marker = method, filled = measured, hollow = estimated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = sorted({r.runtime for r in rows})
    devices = sorted({r.device for r in rows})
    colours = dict(zip(devices, plt.cm.tab10.colors))
    fig, axes = plt.subplots(1, len(runtimes), figsize=(6.5 * len(runtimes), 5), squeeze=False)
    for ax, runtime in zip(axes[0], runtimes):
        for r in (r for r in rows if r.runtime == runtime):
            c = colours[r.device]
            ax.scatter(r.size_bytes / MIB, 1000 / r.decode_tps, marker=METHOD_MARKERS.get(r.method, "x"), s=60,
                       facecolors=c if r.source == "measured" else "none", edgecolors=c, linewidths=1.5)
        for device in devices:  # connect a device's points: its storage/latency trade-off
            pts = sorted((r.size_bytes / MIB, 1000 / r.decode_tps) for r in rows
                         if r.runtime == runtime and r.device == device and r.source == "estimated")
            if pts:
                ax.plot(*zip(*pts), color=colours[device], alpha=0.3, lw=1)
        types = sorted({r.type for r in rows if r.runtime == runtime})
        ax.set(xlabel="stored size (MiB)", ylabel="decode latency (ms / token)", yscale="log",
               title=f"{runtime} ({', '.join(types)})")
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=colours[d], marker="o", ls="", label=d) for d in devices]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", mfc="none", label=k) for k, m in METHOD_MARKERS.items()]
    handles += [plt.Line2D([], [], color="k", marker="o", ls="", label="measured (filled)"),
                plt.Line2D([], [], color="k", marker="o", mfc="none", ls="", label="estimated (hollow)")]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
