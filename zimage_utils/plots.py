"""OUTPUT/loss_per_sigma.png: the loss of each noise-level bin over the run, drawn from OUTPUT/train_log.jsonl.

Low-sigma bins (nearly clean latents) learn detail, high-sigma bins learn composition; a run whose low bins stay flat
is not learning the fine detail, whatever the average says. matplotlib draws it through its Agg canvas (no pyplot,
no display, no global state), imported only when a plot is made.
"""

import json
import logging
import math
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_TRAIN_BIN = re.compile(r"loss/sigma_([\d.]+)-([\d.]+)")  # SigmaBinMeter: the loss of sigma in [a, b)
_VAL_SIGMA = re.compile(r"val/loss_sigma_([\d.]+)")  # validation_loss: the held-out loss at one sigma


def read_log(path: str | Path) -> list[dict]:
    """The records of a train_log.jsonl by step; a step logged twice (a run resumed from an earlier checkpoint
    logs its steps again) keeps its newest values. Training records hold "loss", validation records "val/loss"."""
    by_step: dict[int, dict] = {}
    damaged = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                by_step.setdefault(record["step"], {}).update(record)
            except (ValueError, KeyError, TypeError):  # a line cut short (a full disk, a power cut): not a record
                damaged.append(number)
    if damaged:
        logger.warning(
            f"{path}: line(s) {', '.join(map(str, damaged[:5]))} are not log records (cut short?): left out"
        )
    return [by_step[step] for step in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss_per_sigma(train_log_path: str | Path, png_path: str | Path) -> Path | None:
    """Draw the training loss per sigma bin and overall against the step (top panel) and, when the log has
    validation records (--validation_split > 0), the held-out loss per sigma (bottom panel). Bins and validation
    sigmas share colours by noise level (dark = clean, yellow = noise). Noisy training curves are drawn faintly,
    with a trailing moving average over ~1/25 of the logs on top.

    Returns the PNG's path (written atomically), or None when the log has no losses yet or matplotlib is missing.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed, so no %s: pip install -r requirements.txt", png_path)
        return None
    records = read_log(train_log_path) if Path(train_log_path).exists() else []
    train_keys = sorted({k for r in records for k in r if _TRAIN_BIN.fullmatch(k)})
    val_keys = sorted({k for r in records for k in r if _VAL_SIGMA.fullmatch(k)})
    if not any("loss" in r for r in records):
        return None

    figure = Figure(figsize=(9, 8 if val_keys else 4.5), dpi=100, layout="constrained")
    axes = figure.subplots(2 if val_keys else 1, 1, sharex=True, squeeze=False)[:, 0]
    colour = colormaps["viridis"]
    steps, loss = _series(records, "loss")
    window = max(1, len(steps) // 25)
    smoothed = f" (moving average of {window} logs)" if window > 1 else ""

    def draw(ax, xs, ys, label, color, style="-"):
        if window > 1:
            ax.plot(xs, ys, style, color=color, alpha=0.2, linewidth=0.8)
            ys = _moving_average(ys, window)
        ax.plot(xs, ys, style, color=color, label=label, linewidth=1.5, marker="." if len(xs) < 30 else None)

    ax = axes[0]
    for key in train_keys:
        low, high = (float(v) for v in _TRAIN_BIN.fullmatch(key).groups())
        draw(ax, *_series(records, key), f"σ {low:g}–{high:g}", colour((low + high) / 2))
    draw(ax, steps, loss, "all σ", "black", "--")
    ax.set_title(f"training loss per noise level σ{smoothed}")
    if val_keys:
        ax = axes[1]
        for key in val_keys:
            sigma = float(_VAL_SIGMA.fullmatch(key).group(1))
            xs, ys = _series(records, key)
            ax.plot(xs, ys, "o-", color=colour(sigma), label=f"σ = {sigma:g}")
        xs, ys = _series(records, "val/loss")
        ax.plot(xs, ys, "o--", color="black", label="mean")
        ax.set_title("validation loss per σ (held-out items, fixed noise)")
    for ax in axes:
        ax.set_ylabel("flow-matching MSE")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    axes[-1].set_xlabel("step")

    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(png_path)
    return png_path
