"""Plots of rewards for MLflow: how reward relates to answer length, per task.

    from tao_spark.rewards.plots import reward_length_figure
    fig = reward_length_figure(frame)   # columns: task, words, reward
    mlflow.log_figure(fig, "plots/reward_length.png")

The frame is what ``tao sql`` gives from ``scores`` joined with ``candidates`` (README, "Rewards"), or the
held-out scores of a trained reward model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def reward_length_figure(frame: pd.DataFrame, title: str = "reward vs. answer length") -> Any:
    """Scatter of reward against length (words or tokens) per task, with each task's least-squares line and r.

    ``frame`` needs ``task``, ``reward`` and ``words`` (or ``tokens``); rows with a NULL reward are left out.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    length = "words" if "words" in frame.columns else "tokens"
    data = frame.dropna(subset=["reward", length])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task, group in sorted(data.groupby("task"), key=lambda kv: str(kv[0])):
        x, y = group[length].astype(float).tolist(), group["reward"].astype(float).tolist()
        slope, intercept, r = _fit(x, y)
        points = ax.scatter(x, y, s=10, alpha=0.5, label=f"{task} (n={len(x)}, r={r:+.2f})")
        if not math.isnan(slope):
            xs = [min(x), max(x)]
            ax.plot(xs, [intercept + slope * v for v in xs], color=points.get_facecolor()[0], linewidth=1.5)
    ax.set_xlabel(f"answer length ({length})")
    ax.set_ylabel("reward")
    ax.set_title(title)
    if len(data):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares slope, intercept and Pearson r; NaNs when x or y is constant or too short."""
    if len(x) < 2:
        return math.nan, math.nan, math.nan
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    if sxx == 0:
        return math.nan, math.nan, math.nan
    slope = sxy / sxx
    return slope, my - slope * mx, sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan
