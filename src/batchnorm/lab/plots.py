"""Every figure the lab draws (matplotlib, Agg backend: no display needed).

Each function writes one PNG and returns its caption. Colors stay fixed across figures: BN blue,
no BN red (seed 000's 'b' and 'r'), other variants from the tab10 cycle. Curves are the mean over
seeds with a band from the lowest to the highest seed, so the spread is visible, not averaged away.
"""
from __future__ import annotations

import contextlib
import io as _io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .models import label  # noqa: E402

COLORS = {"bn": "#1f5fbf", "none": "#d1342f"}
_CYCLE = ["#2a9d5c", "#8e44ad", "#e08e0b", "#17becf", "#7f7f7f"]
DPI = 130


# marker and line style per variant, so that lines that coincide (GhostBN is BN at batches up to its
# virtual batch) stay visible: the dashed line with open markers lets the one below show through.
LINES = {"ghost": ("s", "--"), "renorm": ("^", "-"), "bn-seed002": ("D", "--")}


def line(variant: str) -> dict:
    marker, style = LINES.get(variant, ("o", "-"))
    open_marker = style != "-"
    return {"marker": marker, "linestyle": style, "markerfacecolor": "white" if open_marker else color(variant)}


def color(variant: str) -> str:
    if variant not in COLORS:
        COLORS[variant] = _CYCLE[(len(COLORS) - 2) % len(_CYCLE)]
    return COLORS[variant]


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _save(fig, path: Path) -> None:
    from .io import write_bytes

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def _stack(histories, column: str) -> np.ndarray:
    """(seeds, epochs) with NaN after a seed's last epoch (a diverged run stops early)."""
    length = max(len(h.rows) for h in histories)
    out = np.full((len(histories), length), np.nan)
    for i, h in enumerate(histories):
        out[i, :len(h.rows)] = h.column(column)
    return out


def _band(ax, x, values: np.ndarray, variant: str, name: str) -> None:
    with _quiet():
        mean, low, high = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
    ax.fill_between(x, low, high, color=color(variant), alpha=0.18, linewidth=0)
    ax.plot(x, mean, color=color(variant), linewidth=1.8, label=name)


@contextlib.contextmanager
def _quiet():
    """Silence numpy's 'mean of empty slice' for epochs where every seed has stopped (diverged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def curves(path: Path, groups, *, title: str, target: float | None = None) -> str:
    """Training loss and test accuracy per epoch, one line + band per group."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    seeds = max(len(g.results) for g in groups)
    for g in groups:
        histories = [r.history for r in g.results]
        loss = _stack(histories, "train_loss")
        acc = _stack(histories, "test_accuracy")
        x = np.arange(1, loss.shape[1] + 1)
        _band(ax_loss, x, loss, g.variant, label(g.variant))
        _band(ax_acc, x, acc, g.variant, label(g.variant))
    if np.all([np.nanmin(_stack([r.history for r in g.results], "train_loss")) > 0 for g in groups]):
        ax_loss.set_yscale("log")
    if loss.shape[1] >= 100:  # long runs: log epochs, so the first tens of epochs, where BN pulls ahead, are visible
        for ax in (ax_loss, ax_acc):
            ax.set_xscale("log")
    if target:
        ax_acc.axhline(target, color="#555555", linestyle=":", linewidth=1)
        ax_acc.annotate(f"target {100 * target:.0f}%", (1, target), xytext=(2, 3), textcoords="offset points",
                        fontsize=8, color="#555555")
    xlabel = "epoch (log scale)" if ax_loss.get_xscale() == "log" else "epoch"
    _style(ax_loss, "Training loss", xlabel, "cross-entropy (log scale)" if ax_loss.get_yscale() == "log" else "cross-entropy")
    _style(ax_acc, "Test accuracy (eval mode: running statistics)", xlabel, "accuracy")
    ax_acc.legend(frameon=False, loc="lower right")
    ax_loss.legend(frameon=False, loc="upper right")
    fig.suptitle(f"{title}: mean over {seeds} seed{'s' if seeds > 1 else ''}, band = lowest to highest seed",
                 fontsize=12, x=0.01, ha="left")
    fig.tight_layout()
    _save(fig, path)
    return (f"Training loss and test accuracy per epoch, BN against no BN: line = mean over {seeds} seeds, "
            f"shaded band = lowest to highest seed.")


def circles(path: Path, data, boundaries: dict[str, tuple[list, float]], box: float) -> str:
    """The circles data, and each net's decision boundary (seed 0) over the test points."""
    panels = 1 + len(boundaries)
    fig, axes = plt.subplots(1, panels, figsize=(4.1 * panels, 4.2))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("coolwarm")
    x_train, y_train = data.x_train.numpy(), data.y_train.numpy()
    x_test, y_test = data.x_test.numpy(), data.y_test.numpy()
    ax = axes[0]
    ax.scatter(x_train[:, 0], x_train[:, 1], c=y_train, cmap=cmap, s=9, edgecolors="k", linewidths=0.25, label="train")
    ax.scatter(x_test[:, 0], x_test[:, 1], c=y_test, cmap=cmap, s=14, marker="^", edgecolors="k", linewidths=0.25, label="test")
    ax.set_title(f"make_circles: {len(x_train)} train (o), {len(x_test)} test (^)", fontsize=10, loc="left")
    for ax, (name, (grid, acc)) in zip(axes[1:], boundaries.items()):
        grid = np.asarray(grid)
        axis = np.linspace(-box, box, grid.shape[0])
        ax.contourf(axis, axis, grid, levels=np.linspace(0, 1, 11), cmap=cmap, alpha=0.55)
        ax.contour(axis, axis, grid, levels=[0.5], colors="k", linewidths=1.2)
        ax.scatter(x_test[:, 0], x_test[:, 1], c=y_test, cmap=cmap, s=9, edgecolors="k", linewidths=0.25)
        ax.set_title(f"{name} (seed 0): test accuracy {100 * acc:.1f}%", fontsize=10, loc="left")
    for ax in axes:
        ax.set_xlim(-box, box)
        ax.set_ylim(-box, box)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path)
    return ("The data of seed 000 (class 0 outer circle, class 1 inner circle), and the decision boundary "
            "each net learned (seed 0), drawn over the test points; shading = predicted probability of the inner class.")


def sweep(path: Path, groups, *, xlabel: str, logx: bool, target: float, title: str = "") -> str:
    """Final test accuracy and training loss against the swept value, one line per variant."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    variants = list(dict.fromkeys(g.variant for g in groups))
    any_diverged = False
    for v in variants:
        rows = sorted((g for g in groups if g.variant == v), key=lambda g: g.setting)
        x = np.array([g.setting for g in rows])
        acc = [np.array(g.finals("test_accuracy"), dtype=float) for g in rows]
        loss = [np.array(g.finals("train_loss"), dtype=float) for g in rows]
        for ax, values in ((ax_acc, acc), (ax_loss, loss)):
            with _quiet():
                mean = np.array([np.nanmean(a) if np.isfinite(a).any() else np.nan for a in values])
                low = np.array([np.nanmin(a) if np.isfinite(a).any() else np.nan for a in values])
                high = np.array([np.nanmax(a) if np.isfinite(a).any() else np.nan for a in values])
            ax.fill_between(x, low, high, color=color(v), alpha=0.18, linewidth=0)
            ax.plot(x, mean, color=color(v), linewidth=1.8, markersize=5, label=label(v), **line(v))
        for g in rows:
            if g.diverged():
                any_diverged = True
                ax_acc.plot([g.setting], [0.02], marker="x", color=color(v), markersize=9, mew=2)
                ax_acc.annotate(f"{g.diverged()}/{len(g.results)}", (g.setting, 0.02), xytext=(5, 4),
                                textcoords="offset points", fontsize=8, color=color(v))
    for ax in (ax_acc, ax_loss):
        if logx:
            ax.set_xscale("log", base=2 if "batch" in xlabel else 10)
        ticks = sorted({g.setting for g in groups})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax_acc.set_ylim(0, 1.02)
    ax_acc.axhline(target, color="#555555", linestyle=":", linewidth=1)
    ax_loss.set_yscale("log")
    _style(ax_acc, "Final test accuracy" + ("  (x = diverged seeds)" if any_diverged else ""), xlabel, "accuracy")
    _style(ax_loss, "Final training loss", xlabel, "cross-entropy (log scale)")
    # One legend for both panels, below them: inside, it covers points at some setting or other.
    handles, names = ax_acc.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), frameon=False)
    seeds = max(len(g.results) for g in groups)
    fig.suptitle(f"{title + ': ' if title else ''}mean over {seeds} seeds, band = lowest to highest seed",
                 fontsize=12, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.07 * ((len(names) + 3) // 4), 1, 1))
    _save(fig, path)
    return (f"Final test accuracy (left) and training loss (right) against the {xlabel}: mean over {seeds} seeds, "
            f"band = lowest to highest seed; dotted line = the target accuracy"
            + ("; x = seeds that diverged (loss became NaN/Inf), with their count." if any_diverged else "."))


def gap(path: Path, results, sizes: list[int], seed002=()) -> str:
    """Accuracy with batch statistics vs running statistics: by test batch size, and per epoch."""
    fig, (ax_size, ax_epoch) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    running = np.array([r.extras["running_stats_accuracy"] for r in results])
    batch = np.array([[r.extras["batch_stats_accuracy"][str(b)] for b in sizes] for r in results])
    x = np.array(sizes)
    ax_size.fill_between(x, batch.min(0), batch.max(0), color=color("bn"), alpha=0.18, linewidth=0)
    ax_size.plot(x, batch.mean(0), "o-", color=color("bn"), label="batch statistics (train mode)")
    ax_size.axhspan(running.min(), running.max(), color="#2a9d5c", alpha=0.15, linewidth=0)
    ax_size.axhline(running.mean(), color="#2a9d5c", linewidth=1.8, label="running statistics (eval mode)")
    if seed002:
        other = np.array([r.extras["running_stats_accuracy"] for r in seed002])
        ax_size.axhline(other.mean(), color="#e08e0b", linewidth=1.6, linestyle="--",
                        label="running statistics, seed 002's rule")
    ax_size.set_xscale("log", base=2)
    ax_size.set_xticks(sizes)
    ax_size.set_xticklabels([str(s) for s in sizes])
    ax_size.minorticks_off()
    ax_size.set_ylim(0, 1.02)
    _style(ax_size, "Test accuracy after training, by test batch size", "test batch size", "accuracy")
    ax_size.legend(frameon=False, loc="lower right")
    histories = [r.history for r in results]
    eval_acc = _stack(histories, "test_accuracy")
    train_acc = _stack(histories, "test_accuracy_batch_stats")
    epochs = np.arange(1, eval_acc.shape[1] + 1)
    batch_size = results[0].cell.settings.batch_stats_eval
    with _quiet():
        ax_epoch.plot(epochs, np.nanmean(eval_acc, 0), color="#2a9d5c", linewidth=1.8, label="running statistics")
        ax_epoch.plot(epochs, np.nanmean(train_acc, 0), color=color("bn"), linewidth=1.8,
                      label=f"batch statistics (test batches of {batch_size})")
    if seed002:
        other = _stack([r.history for r in seed002], "test_accuracy")
        with _quiet():
            ax_epoch.plot(np.arange(1, other.shape[1] + 1), np.nanmean(other, 0), color="#e08e0b", linewidth=1.6,
                          linestyle="--", label="running statistics, seed 002's rule")
    ax_epoch.fill_between(epochs, np.nanmin(eval_acc, 0), np.nanmax(eval_acc, 0), color="#2a9d5c", alpha=0.15, linewidth=0)
    ax_epoch.fill_between(epochs, np.nanmin(train_acc, 0), np.nanmax(train_acc, 0), color=color("bn"), alpha=0.15, linewidth=0)
    _style(ax_epoch, "Test accuracy during training", "epoch", "accuracy")
    ax_epoch.legend(frameon=False, loc="lower right")
    fig.suptitle(f"gap-sweep, BN net: mean over {len(results)} seeds, band = lowest to highest seed", fontsize=11, x=0.01, ha="left")
    fig.tight_layout()
    _save(fig, path)
    return ("Left: test accuracy of the trained BN net when each test batch is normalized with its own statistics "
            "(train mode, blue) against the running statistics (eval mode, green), by test batch size. Right: both "
            "per epoch while training."
            + (" Dashed orange: the same net keeping its running statistics by seed 002's rule (opposite momentum "
               "convention, biased variance, starting at 0), which the library does not follow." if seed002 else ""))
