"""`megads plot`: PNG figures from runs' `metrics.jsonl` (one JSON object per optimizer step).

Figures written (each only when some run has the fields it shows):

    loss.png                  language-model loss of every LM run overlaid (MTP loss dashed, valid_loss as markers)
    throughput.png            tokens/s per step, and TFLOP/s per device and MFU when logged
    expert_load_<run>.png     per LM run: a layer x step heatmap of expert load imbalance (max/mean)
    expert_load_per_expert_<run>.png   per LM run that logged `expert_load`: an expert x step heatmap per
                              MoE layer of each expert's tokens over the mean
    grpo_<run>.png            per GRPO run: reward, accuracy (held-out accuracy as markers), completion length, KL

Skipped steps log null for non-finite values: they become NaN, which matplotlib leaves as a gap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from megads.errors import RunFailure


@dataclass
class Run:
    label: str
    records: list[dict]

    @property
    def is_grpo(self) -> bool:
        # GRPO records also carry a `loss` (the policy loss), so the rollout reward tells them apart.
        return any("reward_mean" in r for r in self.records)

    def has(self, key: str) -> bool:
        return any(r.get(key) is not None for r in self.records)

    def series(self, key: str, *, only_present: bool = False) -> tuple[list[int], list[float]]:
        """Steps and values of `key`; a null (skipped step) is NaN, a missing key is NaN or left out."""
        steps, values = [], []
        for record in self.records:
            if key not in record and only_present:
                continue
            value = record.get(key)
            if only_present and value is None:
                continue
            steps.append(record["step"])
            values.append(float(value) if isinstance(value, (int, float)) else math.nan)
        return steps, values


def read_run(run_dir: Path, label: str) -> Run:
    """The records of RUN_DIR/metrics.jsonl; a missing file or a damaged line is a RunFailure naming it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RunFailure(f"{path} does not exist: is {run_dir} a megads run directory?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise RunFailure(f"{path} line {number} is not a JSON object with an integer step (a damaged line).")
        records.append(record)
    if not records:
        raise RunFailure(f"{path} holds no steps yet.")
    return Run(label, records)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or its path as given where two runs share a name (their files would clash)."""
    names = [d.resolve().name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def file_safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "run"


# Small dots on every line: a value between two skipped steps (NaN on both sides) would otherwise not show.
LINE = {"marker": ".", "markersize": 3}


def integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_loss(runs: list[Run], plt, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        steps, loss = run.series("loss")
        (line,) = ax.plot(steps, loss, label=run.label, **LINE)
        color = line.get_color()  # the same run keeps one color across its three series
        if run.has("mtp_loss"):
            ax.plot(*run.series("mtp_loss"), linestyle="--", color=color, label=f"{run.label} MTP", **LINE)
        if run.has("valid_loss"):
            ax.plot(*run.series("valid_loss", only_present=True), linestyle="none", marker="o", color=color,
                    label=f"{run.label} valid")
    ax.set(xlabel="step", ylabel="loss", title="Language-model loss")
    integer_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_throughput(runs: list[Run], plt, path: Path) -> None:
    panels = [(key, ylabel) for key, ylabel in (("tokens_per_s", "tokens/s"),
                                                 ("tflops_per_device", "TFLOP/s per device"),
                                                 ("mfu", "MFU"))
              if any(run.has(key) for run in runs)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, ylabel) in zip(axes[:, 0], panels):
        for run in runs:
            if run.has(key):
                ax.plot(*run.series(key), label=run.label, **LINE)
        ax.set_ylabel(ylabel)
        integer_steps(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0, 0].set_title("Throughput")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_expert_load(run: Run, plt, path: Path) -> None:
    """Layer x step heatmap of `expert_load_max_over_mean` (tokens of the busiest expert over the mean),
    logged every step: which layers (and when) route unevenly; 1.0 is perfect balance. Which experts
    are overloaded is `plot_expert_load_per_expert`'s figure."""
    import numpy as np

    layers: list[str] = []  # first-appearance order is the model's order
    for record in run.records:
        for layer in record.get("expert_load_max_over_mean") or {}:
            if layer not in layers:
                layers.append(layer)
    steps = [r["step"] for r in run.records]
    grid = np.full((len(layers), len(steps)), np.nan)
    for column, record in enumerate(run.records):
        for layer, value in (record.get("expert_load_max_over_mean") or {}).items():
            if isinstance(value, (int, float)):
                grid[layers.index(layer), column] = value
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * len(layers)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), layers)
    integer_steps(ax)
    ax.set(xlabel="step", title=f"{run.label}: expert load imbalance (max/mean tokens per expert)")
    fig.colorbar(image, ax=ax, label="max / mean")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_expert_load_per_expert(run: Run, plt, path: Path) -> None:
    """One expert x step heatmap per MoE layer of `expert_load` (each expert's tokens over the mean,
    logged every train.expert_load_every steps): which experts are overloaded, and whether the
    routing bias evens them out. One colour scale for all layers: 0 blue, 1 (balance) white."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    logged = [r for r in run.records if isinstance(r.get("expert_load"), dict)]
    layers: list[str] = []
    for record in logged:
        layers += [layer for layer in record["expert_load"] if layer not in layers]
    steps = [r["step"] for r in logged]
    grids = []
    for layer in layers:
        experts = max(len(r["expert_load"].get(layer) or []) for r in logged)
        grid = np.full((experts, len(steps)), np.nan)
        for column, record in enumerate(logged):
            load = record["expert_load"].get(layer) or []
            grid[:len(load), column] = load
        grids.append(grid)
    top = max([2.0] + [float(np.nanmax(g)) for g in grids if np.isfinite(g).any()])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)   # starved blue, balanced white, overloaded red
    columns = min(4, len(layers))
    rows = -(-len(layers) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.5 * columns + 1, 3 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax, layer, grid in zip(axes.flat, layers, grids):
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="coolwarm",
                          norm=norm, extent=(-0.5, len(steps) - 0.5, grid.shape[0] - 0.5, -0.5))
        ticks = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int)))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set(title=layer, xlabel="step", ylabel="expert")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"{run.label}: tokens per expert over the mean (1 = balanced)")
    fig.colorbar(image, ax=axes, label="load / mean")
    fig.savefig(path)
    plt.close(fig)


def plot_grpo(run: Run, plt, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, key, title in ((axes[0, 0], "reward_mean", "reward (mean)"), (axes[0, 1], "accuracy", "accuracy"),
                           (axes[1, 0], "completion_length_mean", "completion length (tokens)"),
                           (axes[1, 1], "kl_ref", "KL to reference")):
        ax.plot(*run.series(key), label="rollouts", **LINE)
        if key == "accuracy" and run.has("eval_accuracy"):
            ax.plot(*run.series("eval_accuracy", only_present=True), linestyle="none", marker="o",
                    label="held-out (greedy)")
            ax.legend(fontsize="small")
        ax.set_title(title)
        integer_steps(ax)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{run.label}: GRPO")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_runs(run_dirs: list[Path], output_dir: Path) -> list[Path]:
    """Write the figures for `run_dirs` into `output_dir`; returns the paths written."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = [read_run(d, label) for d, label in zip(run_dirs, run_labels(run_dirs))]
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    lm_runs = [run for run in runs if not run.is_grpo]
    if any(run.has("loss") for run in lm_runs):
        written.append(output_dir / "loss.png")
        plot_loss(lm_runs, plt, written[-1])
    if any(run.has("tokens_per_s") or run.has("mfu") for run in lm_runs):
        written.append(output_dir / "throughput.png")
        plot_throughput(lm_runs, plt, written[-1])
    for run in lm_runs:
        if run.has("expert_load_max_over_mean"):
            written.append(output_dir / f"expert_load_{file_safe(run.label)}.png")
            plot_expert_load(run, plt, written[-1])
        if run.has("expert_load"):
            written.append(output_dir / f"expert_load_per_expert_{file_safe(run.label)}.png")
            plot_expert_load_per_expert(run, plt, written[-1])
    for run in runs:
        if run.is_grpo:
            written.append(output_dir / f"grpo_{file_safe(run.label)}.png")
            plot_grpo(run, plt, written[-1])
    return written
