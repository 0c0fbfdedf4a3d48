"""The bundle's model card (README.md): what it is, where it came from, and only figures that were measured."""

from __future__ import annotations


def model_card(m: dict) -> str:
    src, method, run = m["source"], m["method"], m["run"]
    params = run["parameters"]
    lines = [f"# {src.get('model') or 'model'} - FlexiGPT {m['target'].upper()} bundle", "",
             f"- Source model: `{src.get('model')}` ({_n(src.get('parameters'))} parameters), sha256 `{src.get('sha256')}`",
             f"- Licence of the source model: **{m['licence']}** (the bundle inherits it)",
             f"- Method: {method['name']}; pruned blocks {method['pruned_blocks']}; slot -> base {m['slot_map'] or 'none'}",
             f"- Settings: {_settings(method['settings'])}",
             f"- Recovery: {_recovery(method.get('recovery'))}",
             f"- Runtime: {m['runtime']['name']} (loading parameters in `{m['runtime']['config_file']}`)",
             f"- Unique parameters: {_n(m['unique_parameters'])} (stored once each; the model computes with "
             f"{_n(params.get('computed'))})",
             f"- Device: {_device(m['device'])}", "", "## Measured figures", ""]
    lines += _figures(m)
    lines += ["", "## Files", "", "Every file's sha256 and size are in `manifest.json`; check them and load the model "
              "with `flexiedge verify BUNDLE`, generate with `flexiedge run BUNDLE \"prompt\"`.", ""]
    return "\n".join(lines)


def _figures(m: dict) -> list[str]:
    rows = [("stored bytes (model files)", _bytes(m))]
    storage = (m.get("export") or {}).get("storage") or {}
    if storage.get("bytes_over_unique"):
        rows.append(("bytes / unique parameters' bytes", f"{storage['bytes_over_unique']:.4f}"))
    verify = (m.get("export") or {}).get("verify") or {}
    if "logit_max_abs_diff" in verify:
        rows.append(("max logit diff vs PyTorch (export check)", f"{verify['logit_max_abs_diff']:.3g}"))
    for key, value in sorted((m.get("figures") or {}).items()):
        rows.append((key.replace("_", " "), f"{value:.4g}" if isinstance(value, float) else str(value)))
    if len(rows) == 1:
        rows.append(("quality / latency", "not measured for this bundle (run `flexiedge pipeline` to measure)"))
    return ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _bytes(m: dict) -> str:
    storage = (m.get("export") or {}).get("storage") or {}
    total = storage.get("total_bytes") or ((storage.get("data_bytes") or 0) + (storage.get("model_bytes") or 0))
    return f"{total:,}" if total else "see manifest.json"


def _settings(settings: dict) -> str:
    keys = ("ratio", "blocks", "rank", "selection", "output_norm")
    return ", ".join(f"{k} {settings[k]}" for k in keys if settings.get(k) is not None) or "n/a"


def _recovery(recovery: dict | None) -> str:
    if not recovery:
        return "none (adapters as initialised from the SVD)"
    return f"{_n(recovery.get('tokens'))} tokens, recipe {recovery.get('recipe')}, data {recovery.get('data')}"


def _device(device: dict) -> str:
    if not device.get("name"):
        return "none named"
    if device.get("profile") is None:
        return f"{device['name']} (no profile figures available)"
    return f"{device['name']} (profile figures in manifest.json)"


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)
