"""Loss curves: `tinygpt plot OUT_DIR [OUT_DIR ...] [-o FILE]` draws the runs' evaluations from
their metrics.jsonl, train and val loss against step and against wall-clock time, a colour a run
labelled with its name and the settings that differ between the runs; `curves` draws any series
(benchmarks/bench_quality.py's sweeps use it). PNG or SVG by the file's extension (matplotlib)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from .errors import UserError, os_reason
from .metrics import NAME

FORMATS = (".png", ".svg", ".pdf")
NOT_SETTINGS = {"out_dir", "device"}  # differ between runs without changing what they learn


@dataclasses.dataclass
class Run:
    """A run's evaluations, as its metrics file holds them."""

    name: str
    header: dict
    evals: list[dict]  # {"iter", "train", "val", "elapsed"}

    @property
    def settings(self) -> dict:
        config = self.header.get("config", {})
        return {k: v for part in ("model", "train") for k, v in config.get(part, {}).items()
                if k not in NOT_SETTINGS}


def read(out_dir: Path, say: Callable[[str], None]) -> Run | None:
    """The run in `out_dir`, or None (said) when it has no record to plot. Lines that are not
    whole records (a file cut mid-line, a corrupt line) are skipped, and said."""
    path = out_dir / NAME if out_dir.is_dir() else out_dir
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        say(f"{out_dir}: no run's record there ({path} not found); left out")
        return None
    except OSError as e:
        say(f"{path}: cannot be read ({os_reason(e)}); left out")
        return None
    header, evals, skipped = {}, [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["kind"]
            if kind == "eval":
                evals.append({k: float(record[k]) for k in ("iter", "train", "val")}
                             | {"elapsed": float(record.get("elapsed", "nan"))})
            elif kind == "header":
                header = record
        except (ValueError, KeyError, TypeError):
            skipped.append(number)
    if skipped:
        cut = skipped == [len(lines) - (lines[-1] == "")]
        say(f"{path}: skipped line {skipped[0]}, cut short" if cut else
            f"{path}: skipped {len(skipped)} line{'s' * (len(skipped) > 1)} that are not "
            f"records ({', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})")
    if not evals:
        say(f"{path}: no evaluations to plot; left out")
        return None
    name = out_dir.resolve().name if out_dir.is_dir() else path.resolve().parent.name
    return Run(name, header, evals)


def labels(runs: list[Run]) -> list[str]:
    """Each run's name, with the settings whose values differ between the runs."""
    keys = sorted({k for run in runs for k in run.settings})
    differ = [k for k in keys if len({json.dumps(run.settings.get(k)) for run in runs}) > 1]
    return [run.name + (" (" + ", ".join(f"{k} {run.settings.get(k)}" for k in differ) + ")"
                        if differ else "") for run in runs]


def plot_runs(runs: list[Run], path: Path) -> None:
    """Train (dashed) and val (solid) loss of each run against step and against wall time."""
    series = {}
    for run, label in zip(runs, labels(runs)):
        series[label] = {
            kind: [(e["iter"], e["elapsed"], e[kind]) for e in run.evals] for kind in ("train",
                                                                                      "val")}
    # The first evaluation (the untrained model, ln(vocab)) is far above the rest: the axis
    # shows the rest, where the runs differ.
    later = [loss for kinds in series.values() for points in kinds.values()
             for _, _, loss in points[1:]]
    low, high = (min(later), max(later)) if later else (None, None)
    y_range = (low - 0.05 * (high - low), high + 0.1 * (high - low)) if later and high > low \
        else None
    curves(path, series, "train (dashed) and val (solid) loss", by_time=True, y_range=y_range)


def curves(path: Path, series: dict[str, dict[str, list[tuple]]], title: str,
           by_time: bool = False, y_label: str = "loss",
           y_range: tuple[float, float] | None = None) -> None:
    """`series`: label -> {"train"|"val": [(step, seconds, loss)]}, a colour a label, val solid
    and train dashed; a second panel against seconds when `by_time`. The file's extension says
    its format."""
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"cannot draw {path}: name a .png, .svg or .pdf file")
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'tinygpt[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # an SVG's words stay text: searchable, smaller

    panels = 2 if by_time else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.8), squeeze=False)
    for ax, (column, x_label) in zip(axes[0], ((0, "step"), (1, "wall-clock seconds"))):
        for i, (label, kinds) in enumerate(series.items()):
            color = f"C{i % 10}"
            for kind, style in (("val", "-"), ("train", "--")):
                points = [(p[column], p[2]) for p in kinds.get(kind, []) if p[column] == p[column]]
                if points:
                    ax.plot(*zip(*points), style, color=color,
                            label=label if kind == "val" or "val" not in kinds else None)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        if y_range is not None:
            ax.set_ylim(*y_range)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({os_reason(e)})") from e
    finally:
        plt.close(fig)


def main(out_dirs: list[str], output: str, say: Callable[[str], None]) -> Path:
    """`tinygpt plot`: the runs that have a record, drawn into `output`."""
    runs = [run for d in out_dirs if (run := read(Path(d), say)) is not None]
    if not runs:
        raise UserError("nothing to plot: no evaluations in " + ", ".join(out_dirs))
    path = Path(output)
    plot_runs(runs, path)
    return path
