"""report.html: one self-contained page per run (inline CSS, PNGs embedded as base64).

It opens offline in any browser and can be mailed as one file. The page leads with the verdicts
(each with its paired interval and its rule), then the figures, then the numbers, then how the run
was made.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

__all__ = ["render", "command"]

_CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       max-width: 1120px; margin: 2em auto; padding: 0 1.2em; background: #fafafa; }
h1 { font-size: 1.6em; margin-bottom: .1em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
.claim { background: #fff; border: 1px solid #e3e3e3; border-left: 6px solid #999; border-radius: 6px;
         padding: .7em 1em; margin: .8em 0; }
.claim.yes { border-left-color: #2a9d5c; } .claim.no { border-left-color: #d1342f; }
.badge { display: inline-block; font-weight: 600; font-size: .8em; padding: .1em .6em; border-radius: 1em;
         color: #fff; margin-right: .6em; vertical-align: middle; }
.claim.maybe { border-left-color: #d9a400; }
.yes .badge { background: #2a9d5c; } .no .badge { background: #d1342f; } .maybe .badge { background: #b58900; }
.claim .interval { margin-top: .3em; } .claim .rule { color: #666; font-size: .88em; margin-top: .3em; }
.claim .text { font-weight: 600; } .claim .evidence { color: #444; margin-top: .3em; }
figure { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; margin: 1em 0; padding: .8em; }
figure img { max-width: 100%; display: block; margin: auto; } figcaption { color: #555; font-size: .9em; margin-top: .4em; }
table { border-collapse: collapse; background: #fff; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #e3e3e3; padding: .35em .7em; text-align: right; } th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
code, pre { background: #f0f0f0; border-radius: 4px; padding: .1em .3em; font-size: .92em; }
details { margin: .6em 0; } summary { cursor: pointer; color: #1f5fbf; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; margin: 1.2em 0; }
.card { background: #fff; border: 1px solid #e3e3e3; border-top: 5px solid #999; border-radius: 6px;
        padding: .6em 1.2em; min-width: 14em; }
.card .name { font-weight: 600; } .card .big { font-size: 2em; font-weight: 600; line-height: 1.2; }
.card .small { color: #555; font-size: .9em; }
"""

_CARD_COLORS = {"BN": "#1f5fbf", "NoBN": "#d1342f"}


def _e(x: Any) -> str:
    return html.escape(str(x))


def _pct(x: Any, std: Any = None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%" + (f" ± {100 * std:.1f}" if std else "")


def _num(x: Any, std: Any = None) -> str:
    if x is None:
        return "n/a (diverged)"
    return f"{x:.4f}" + (f" ± {std:.4f}" if std else "")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(path.name)}" src="data:image/png;base64,{data}">'


# RunConfig fields that change only what is printed, never a number: left out of the command.
_NOT_NUMBERS = ("experiment", "log_every")


def _flag_value(value) -> str:
    if value == []:
        return "none"  # --tune-lr none
    if isinstance(value, list):
        return ",".join(_flag_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)  # repr round-trips a float exactly; :g would round 0.123456789
    return str(value)


def command(config: dict) -> str:
    """`batchnorm run ...` with every flag whose value differs from the experiment's default, so that
    the command reproduces the run (same config, same numbers). `--seeds` is always given."""
    from .config import RunConfig
    from .experiments import get

    name = config["experiment"]
    default = RunConfig(experiment=name, **get(name).defaults).numbers()
    parts = ["batchnorm", "run", name]
    for key, value in config.items():
        if key in _NOT_NUMBERS or key not in default or (value == default[key] and key != "seeds"):
            continue
        if isinstance(value, bool):
            parts.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
            continue
        if value is None:
            continue
        parts += [f"--{key.replace('_', '-')}", _flag_value(value)]
    return " ".join(parts)


def _code(version: dict | None) -> str:
    if not version:
        return "not recorded"
    commit = version.get("git_commit")
    where = (f"git commit {commit}" + (" with uncommitted changes" if version.get("git_dirty") else "")) if commit else "no git checkout"
    return f"batchnorm {version['package']}, {where}, source SHA-256 {version['source_sha256']}"


def _cards(summary: dict) -> list[str]:
    """The headline: one card per variant when there are few (the comparisons), none for sweeps."""
    variants = summary["variants"]
    if not 1 <= len(variants) <= 3:
        return []
    target = summary["target_accuracy"]
    cards = ["<div class='cards'>"]
    for name, v in variants.items():
        epochs = "never" if v["epochs_to_target"] is None else f"{v['epochs_to_target']:.0f} epochs"
        cards.append(
            f"<div class='card' style='border-top-color: {_CARD_COLORS.get(name, '#999')}'>"
            f"<div class='name'>{_e(name)}</div><div class='big'>{_pct(v['final_test_accuracy'])}</div>"
            f"<div class='small'>final test accuracy ({len(v['seeds'])} seeds)<br>{_pct(target)} reached after {epochs}"
            f"<br>final training loss {_num(v['final_train_loss'])}</div></div>"
        )
    cards.append("</div>")
    return cards


_BADGE = {"supported": "yes", "not supported": "no", "inconclusive": "maybe"}


def _claims(summary: dict) -> list[str]:
    """The verdicts, first on the page: each with its paired interval and the rule it was judged by."""
    out = ["<h2>Verdicts</h2>"]
    if not summary["claims"]:
        out.append("<p>This run's settings do not allow a verdict (it needs both BN and no-BN variants, "
                   "and at least two values on the grid).</p>")
    for c in summary["claims"]:
        interval = (f"<div class='interval'><b>{_e(c['interval'])}</b> — {_e(c['reason'])}</div>"
                    if c.get("interval") else "")
        rule = f"<div class='rule'>Rule (fixed before the run): {_e(c['rule'])}.</div>" if c.get("rule") else ""
        out.append(
            f"<div class='claim {_BADGE.get(c['verdict'], 'maybe')}'><span class='badge'>{_e(c['verdict'])}</span>"
            f"<span class='text'>{_e(c['claim'])}</span>{interval}<div class='evidence'>{_e(c['evidence'])}</div>{rule}</div>"
        )
    return out


def render(summary: dict, folder: Path) -> str:
    """The HTML page for `summary` (as written to summary.json); PNGs are read from `folder`."""
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(summary['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(summary['title'])}</h1>",
        f"<p class='sub'>batchnorm lab · <code>{_e(summary['experiment'])}</code> · "
        f"{_e(summary['environment']['started_utc'])} · {summary['train_seconds']:.0f} s of training</p>",
        f"<p>{_e(summary['description'])}</p>",
    ]
    out += _claims(summary)
    out += _cards(summary)
    out.append("<h2>Figures</h2>")
    for f in summary["figures"]:
        out.append(f"<figure>{_img(folder / f['file'])}<figcaption>{_e(f['caption'])}</figcaption></figure>")
    target = summary["target_accuracy"]
    out += [
        "<h2>Numbers</h2>",
        f"<p>Means over seeds ± standard deviation, after the last epoch. <i>Epochs to {_pct(target)}</i>: "
        "epochs until test accuracy first reached the target, averaged over the seeds that reached it.</p>",
        f"<table><tr><th>variant{' @ ' + _e(summary['setting_name']) if summary.get('setting_name') else ''}</th>"
        "<th>final train loss</th><th>final test accuracy</th>"
        f"<th>epochs to {_pct(target)}</th><th>reached</th><th>diverged</th></tr>",
    ]
    for name, v in summary["variants"].items():
        epochs = "never" if v["epochs_to_target"] is None else f"{v['epochs_to_target']:.1f}"
        out.append(
            f"<tr><td>{_e(name)}</td><td>{_num(v['final_train_loss'], v['final_train_loss_std'])}</td>"
            f"<td>{_pct(v['final_test_accuracy'], v['final_test_accuracy_std'])}</td><td>{epochs}</td>"
            f"<td>{_e(v['reached_target'])}</td><td>{_e(v['diverged'])}</td></tr>"
        )
    out.append("</table>")

    config_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary["config"].items())
    env_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary["environment"].items())
    out += [
        "<h2>How this was made</h2>",
        f"<p><b>Data.</b> {_e(summary['data'])}</p>",
        f"<p><b>Reproduce.</b> <code>{_e(command(summary['config']))}</code> — same seeds, same numbers. "
        "Per-epoch numbers are in <code>metrics.csv</code>, everything on this page in <code>summary.json</code>.</p>",
        f"<details><summary>Configuration</summary><table>{config_rows}</table></details>",
        f"<details><summary>Environment</summary><table>{env_rows}</table></details>",
        f"<p><b>Code.</b> {_e(_code(summary.get('code_version')))}</p>",
        "</body></html>",
    ]
    return "\n".join(out)
