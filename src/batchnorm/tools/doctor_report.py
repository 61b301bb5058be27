"""How `batchnorm doctor` shows a Diagnosis: a text table for the terminal, and one self-contained
HTML page (inline CSS, PNG plots embedded as base64, as the lab's report.html) with a figure per
layer. matplotlib is imported only for the HTML page."""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from pathlib import Path

from .doctor import THRESHOLDS, Diagnosis, LayerReport

__all__ = ["text_table", "html_page", "load_state_dict", "doctor"]

_COLUMNS = ("layer", "C", "momentum", "eps", "min var", "max var", "|w|<1e-3", "shift RMS", "var factor", "status")


def _g(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _row(r: LayerReport) -> tuple[str, ...]:
    var = r.running_var
    dead = None if r.weight is None else int((r.weight.abs() < THRESHOLDS["dead_weight"]).sum())
    ratio = r.mean_abs_log_ratio
    return (
        r.name, str(r.num_features),
        _g(r.momentum) if r.known_hyperparameters else "?", _g(r.eps) if r.known_hyperparameters else "?",
        "-" if var is None else _g(float(var.min())), "-" if var is None else _g(float(var.max())),
        "-" if dead is None else str(dead), _g(r.shift_rms), "-" if ratio is None else _g(math.exp(ratio)),
        "ok" if not r.findings else ", ".join(dict.fromkeys(f.check for f in r.findings)),
    )


def text_table(d: Diagnosis) -> str:
    rows = [_COLUMNS, *(_row(r) for r in d.layers)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    findings = d.findings
    lines.append("")
    lines.append(f"{len(d.layers)} BatchNorm layers, {len(findings)} problem{'s' if len(findings) != 1 else ''}"
                 + (":" if findings else ": all checks passed"))
    lines += [f"  {name}: [{f.check}] {f.message}" for name, f in findings]
    notes = list(d.notes) + [f"{r.name}: {n}" for r in d.layers for n in r.notes]
    lines += [f"note: {n}" for n in notes]
    lines.append("(shift RMS: batch mean - running mean in running standard deviations; var factor: "
                 "exp(mean |log(batch var / running var)|) over channels, 1 = equal; '?': a state_dict stores no momentum or eps)")
    return "\n".join(lines)


_CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       max-width: 1120px; margin: 2em auto; padding: 0 1.2em; background: #fafafa; }
h1 { font-size: 1.6em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; background: #fff; font-size: .9em; }
th, td { border: 1px solid #e3e3e3; padding: .3em .6em; text-align: right; } th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
.bad { color: #d1342f; font-weight: 600; } .good { color: #2a9d5c; font-weight: 600; }
ul.findings li { color: #a12a26; } .note { color: #666; }
figure { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; margin: .8em 0; padding: .6em; }
figure img { max-width: 100%; display: block; margin: auto; }
"""


def _figure(r: LayerReport) -> str | None:
    """running variance, |weight| and (given a batch) shift and variance ratio per channel: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    panels = []
    if r.running_var is not None:
        panels.append(("running variance", r.running_var, True,
                       [THRESHOLDS["tiny_var_eps_fraction"] * (r.eps or THRESHOLDS["default_eps"]), THRESHOLDS["huge_var"]]))
    if r.weight is not None:
        panels.append(("|weight|", r.weight.abs(), True, [THRESHOLDS["dead_weight"]]))
    if r.mean_shift is not None:
        panels.append(("standardized mean shift", r.mean_shift, False, [-THRESHOLDS["shift_rms"], THRESHOLDS["shift_rms"]]))
        panels.append(("batch var / running var", r.var_ratio, True, [0.5, 2.0]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.4), squeeze=False)
    for ax, (title, values, log, limits) in zip(axes[0], panels):
        v = values.numpy()
        finite = v[(v == v) & (abs(v) != float("inf"))]
        positive = log and finite.size and (finite > 0).all()
        ax.plot(range(len(v)), v, "o", markersize=3, color="#1f5fbf")
        for limit in limits:
            ax.axhline(limit, color="#d1342f", linewidth=0.8, linestyle="--")
        if positive:
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())  # no 6x10^0 labels between decades
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlabel("channel", fontsize=8)
        ax.tick_params(labelsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_page(d: Diagnosis) -> str:
    e = html.escape
    status = ("<p class='good'>All checks passed.</p>" if d.ok
              else f"<p class='bad'>{len(d.findings)} problem(s) in {len({n for n, _ in d.findings})} layer(s).</p>")
    head = "".join(f"<th>{e(c)}</th>" for c in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _row(r)) + "</tr>" for r in d.layers)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>batchnorm doctor</title><style>{_CSS}</style></head><body>",
             f"<h1>batchnorm doctor</h1><p>{len(d.layers)} BatchNorm layers, from a {e(d.source)}.</p>", status,
             f"<table><tr>{head}</tr>{body}</table>"]
    parts += [f"<p class='note'>note: {e(n)}</p>" for n in d.notes]
    for r in d.layers:
        parts.append(f"<h2>{e(r.name)} <span class='{'good' if not r.findings else 'bad'}'>"
                     f"{'ok' if not r.findings else 'problems'}</span></h2>")
        if r.findings:
            parts.append("<ul class='findings'>" + "".join(f"<li>[{e(f.check)}] {e(f.message)}</li>" for f in r.findings) + "</ul>")
        parts += [f"<p class='note'>note: {e(n)}</p>" for n in r.notes]
        png = _figure(r)
        if png is not None:
            parts.append(f"<figure><img alt='{e(r.name)}' src='data:image/png;base64,{png}'></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def load_state_dict(path: Path, key: str | None = None) -> Mapping:
    """The state_dict in the file `path` (torch.load with weights_only=True: no code runs), or under `key`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such checkpoint file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean: not a weights-only torch file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(
            f"{path} could not be loaded as a state_dict with torch.load(weights_only=True): {first} "
            "(a pickled model object is not a state_dict: save model.state_dict())"
        ) from e
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else []
            raise ValueError(f"{path} has no entry {key!r} (its top-level keys: {keys[:10]})")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected {path} to hold a state_dict (a mapping of names to tensors), got a {type(obj).__name__}")
    return obj


def doctor(checkpoint: Path, html_path: Path | None = None, key: str | None = None) -> int:
    """`batchnorm doctor CHECKPOINT`: print the table, write the HTML page if asked; 1 when there are problems."""
    from .doctor import diagnose

    d = diagnose(load_state_dict(checkpoint, key))
    page = html_page(d) if html_path is not None else None  # rendered before anything is written
    print(text_table(d))
    if page is not None:
        Path(html_path).write_text(page, encoding="utf-8")
        print(f"report: {html_path}")
    return 0 if d.ok else 1
