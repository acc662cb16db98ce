"""What an experiment's runs add up to: each arm's mean and spread over seeds, its difference from the baseline
and whether that difference is larger than the seeds' spread, as a Markdown table and as a plot of the
validation loss against the tokens trained on."""

import statistics
from pathlib import Path
from typing import Optional

# Differences are compared with this spread: the two arms' standard deviations over seeds, added. A difference
# below it is one that another draw of seeds could plausibly reverse.
SPREAD_RULE = "the difference of the means exceeds the sum of the two arms' standard deviations over seeds"


def mean_and_std(values: list) -> dict:
    """{"mean", "std"} of the values; std is the sample standard deviation, 0 for a single value."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarised(experiment, results: dict) -> dict:
    """The results with "summary" (per arm: seeds, parameters, mean speed, and mean and std of every final
    figure; true/false figures must hold for every seed) and "comparisons" (every loss of every arm against
    the baseline's: difference, spread, whether it is meaningful by SPREAD_RULE (None with a single seed), and
    the differences paired by seed) and "commits" (those the runs were made at)."""
    summary = {}
    for arm in experiment.arms:
        runs = [run for run in results["runs"] if run["arm"] == arm.name]
        if not runs:
            continue
        figures = {}
        for name, value in runs[0]["final"].items():
            values = [run["final"][name] for run in runs]
            figures[name] = all(values) if isinstance(value, bool) else mean_and_std(values)
        summary[arm.name] = {
            "seeds": len(runs),
            "parameters": runs[0]["parameters"],
            "tokens_per_cpu_second": statistics.fmean(run["tokens_per_cpu_second"] for run in runs),
            "tokens_per_wall_second": statistics.fmean(run["tokens_per_wall_second"] for run in runs),
            "wall_seconds": sum(run["wall_seconds"] for run in runs),
            "final": figures,
        }
    return results | {
        "summary": summary,
        "comparisons": _comparisons(experiment.arms[0].name, summary, results["runs"]),
        "commits": sorted({str(run.get("commit")) for run in results["runs"]}),
    }


def _comparisons(baseline: str, summary: dict, runs: list) -> list:
    if baseline not in summary:
        return []
    comparisons = []
    for arm, figures in summary.items():
        if arm == baseline:
            continue
        for name, value in figures["final"].items():
            if "loss" not in name:
                continue
            reference = summary[baseline]["final"][name]
            difference = value["mean"] - reference["mean"]
            spread = value["std"] + reference["std"]
            judged = min(figures["seeds"], summary[baseline]["seeds"]) > 1
            comparisons.append(
                {
                    "arm": arm,
                    "figure": name,
                    "difference": difference,
                    "spread": spread,
                    "meaningful": abs(difference) > spread if judged else None,
                    "paired": _paired(runs, arm, baseline, name),
                }
            )
    return comparisons


def _paired(runs: list, arm: str, baseline: str, name: str) -> Optional[dict]:
    """The arm's figure minus the baseline's in the same seed (same training windows, and the same initial
    weights where the two share modules), over the seeds both have: mean, std, and in how many it is higher.
    Much of a seed's luck is shared by both arms, so these differences scatter less than the arms do."""
    reference = {run["seed"]: run["final"][name] for run in runs if run["arm"] == baseline}
    differences = [
        run["final"][name] - reference[run["seed"]] for run in runs if run["arm"] == arm and run["seed"] in reference
    ]
    if len(differences) < 2:
        return None
    return mean_and_std(differences) | {"seeds": len(differences), "higher_in": sum(item > 0 for item in differences)}


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) >= 1:
        return f"{value:,.0f}"
    return f"{value:.1e}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"


def markdown_table(results: dict) -> str:
    """The summary as a Markdown table: one row per arm, its figures as mean ± std over seeds, then each loss's
    difference from the baseline, in bold where it is meaningful (see SPREAD_RULE), and the training speed."""
    summary = results["summary"]
    if not summary:
        return "(no finished runs)\n"
    figure_names = list(next(iter(summary.values()))["final"])
    loss_names = [name for name in figure_names if "loss" in name]
    header = ["arm", "seeds", "parameters", *figure_names, *(f"{name} vs baseline" for name in loss_names)]
    rows = [[*header, "tokens per CPU second"]]
    rows.append(["---"] * len(rows[0]))
    for arm, figures in summary.items():
        cells = [arm, str(figures["seeds"]), f"{figures['parameters']:,}"]
        for name in figure_names:
            value = figures["final"][name]
            cells.append(str(value).lower() if isinstance(value, bool) else _mean_std_cell(value))
        differences = {item["figure"]: item for item in results["comparisons"] if item["arm"] == arm}
        cells.extend(_difference_cell(differences.get(name)) for name in loss_names)
        cells.append(f"{figures['tokens_per_cpu_second']:,.0f}")
        rows.append(cells)
    return "".join("| " + " | ".join(row) + " |\n" for row in rows)


def _mean_std_cell(value: dict) -> str:
    return _number(value["mean"]) if value["std"] == 0 else f"{_number(value['mean'])} ± {_number(value['std'])}"


def _difference_cell(comparison: Optional[dict]) -> str:
    if comparison is None:
        return "(baseline)"
    difference = f"{comparison['difference']:+.4f}"
    if comparison["meaningful"] is None:
        return f"{difference} (one seed)"
    cell = f"**{difference}**" if comparison["meaningful"] else f"{difference} (within spread)"
    paired = comparison.get("paired")
    if paired:
        cell += (
            f"; paired by seed {paired['mean']:+.4f} ± {paired['std']:.4f}, higher in {paired['higher_in']} of "
            f"{paired['seeds']}"
        )
    return cell


def plot(results: dict, path: Path) -> Optional[Path]:
    """Write the validation loss against tokens trained on, one line per arm (the mean over seeds) in a band
    of ± one standard deviation, to `path` (PNG); beside it, where the experiment measures them, the final loss
    against key/value-cache bytes per token, or against the window length. Returns the path, or None when
    matplotlib is not installed (it is in the `experiments` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    first = next(iter(results["summary"].values()))["final"]
    second = "kv_cache_bytes_per_token" in first or "loss_at_2x_length" in first
    figure, panels = plt.subplots(1, 2 if second else 1, figsize=(12 if second else 7, 4.5), dpi=100, squeeze=False)
    _plot_curves(panels[0][0], results)
    if "kv_cache_bytes_per_token" in first:
        _plot_against(
            panels[0][1], results, lambda figures: [figures["final"]["kv_cache_bytes_per_token"]["mean"]], "val_loss"
        )
        panels[0][1].set_xscale("log", base=2)
        panels[0][1].set_xlabel("key/value cache per token (bytes, 16-bit)")
    elif "loss_at_2x_length" in first:
        for multiple in (1, 2, 4):
            panels[0][1].axvline(multiple, color="0.85", linewidth=0.8)
        _plot_against(panels[0][1], results, lambda figures: [1, 2, 4], "loss_at_{}x_length")
        panels[0][1].set_xlabel("window length, as a multiple of the trained length")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _plot_curves(axes, results: dict) -> None:
    for arm in results["summary"]:
        curves = [run["curve"] for run in results["runs"] if run["arm"] == arm]
        tokens = [point[0] / 1e6 for point in curves[0]]
        spreads = [mean_and_std([curve[index][1] for curve in curves]) for index in range(len(tokens))]
        means = [spread["mean"] for spread in spreads]
        line = axes.plot(tokens, means, label=f"{arm} ({len(curves)} seeds)")[0]
        low = [spread["mean"] - spread["std"] for spread in spreads]
        high = [spread["mean"] + spread["std"] for spread in spreads]
        axes.fill_between(tokens, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    late = [point[1] for run in results["runs"] for point in run["curve"][len(run["curve"]) // 3 :]]
    axes.set_ylim(min(late) - 0.05, max(late) + 0.05)  # the first evaluations would squash the part worth seeing
    axes.set_xlabel("tokens trained on (millions)")
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_title(f"{results['experiment']}: mean over seeds, band ± 1 std")
    axes.grid(alpha=0.3)
    axes.legend()


def _plot_against(axes, results: dict, positions, figure_pattern: str) -> None:
    """Each arm's final losses (mean, error bar ± 1 std) at the x positions `positions(figures)` gives; the
    figures' names are figure_pattern formatted with each x."""
    for arm, figures in results["summary"].items():
        xs = positions(figures)
        values = [figures["final"][figure_pattern.format(x)] for x in xs]
        means, stds = [value["mean"] for value in values], [value["std"] for value in values]
        axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=arm)
    axes.set_ylabel("final validation loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
