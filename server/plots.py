"""Per-round training curves as PNG files: WER/CER and privacy spent (epsilon) per round.

Uses matplotlib's object-oriented API with the Agg canvas directly (no ``pyplot``), so plotting
never touches a global backend or figure registry and works on machines without a display.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["PLOTS", "plot_round_metrics"]

log = logging.getLogger(__name__)

# File name -> (title, y label, metric keys drawn on it). A plot is written when at least one of
# its keys has a value; keys are the server's per-round metric names (a stable interface).
PLOTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "wer_cer.png": ("Word and character error rate", "error rate", ("wer", "cer")),
    "epsilon.png": (
        "Privacy spent so far (cumulative epsilon after each round)",
        "epsilon",
        ("epsilon_max", "epsilon_mean", "user_epsilon"),
    ),
    "train_loss.png": ("Mean client training loss", "CTC loss", ("train_loss",)),
}


def plot_round_metrics(
    history: Mapping[str, Mapping[int, float]],
    out_dir: Path,
    plots: Mapping[str, tuple[str, str, Sequence[str]]] = PLOTS,
) -> list[Path]:
    """Draw one PNG per entry of ``plots`` from per-round metric values.

    Args:
        history: metric name -> {round: value}.
        out_dir: where the PNG files go (created if missing).
        plots: file name -> (title, y label, metric names); defaults to :data:`PLOTS`.

    Returns:
        The files written (plots whose metrics never appeared in ``history`` are skipped).

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> [p.name for p in plot_round_metrics({"wer": {1: 0.9, 2: 0.7}}, out)]
    ['wer_cer.png']
    """
    written: list[Path] = []
    for file_name, (title, ylabel, keys) in plots.items():
        series = {key: sorted(history[key].items()) for key in keys if history.get(key)}
        if not series:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6.0, 4.0), dpi=100)
        FigureCanvasAgg(fig)  # attaches itself to fig; needed by savefig without pyplot
        ax = fig.add_subplot()
        for key, points in series.items():
            rounds = [r for r, _ in points]
            values = [v for _, v in points]
            ax.plot(rounds, values, marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / file_name
        fig.savefig(path, format="png")
        written.append(path)
        log.debug("wrote %s", path)
    return written
