"""Every figure the package draws: lens KL and knowledge profile by layer, tamper curves, sweeps,
the unlearning trade-off, unlearning runs' training curves and robustness runs compared.

Every figure has a fixed pixel size (figsize x dpi, no tight bounding box), uses the Agg backend
and is written atomically (`files.save_figure_atomic`), so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.atomic import save_figure_atomic
from .robustness_results import UNSEEN, capability, unseen_curves
from .tables import is_number
from .tamper_results import ATTACKED, HELDOUT, half, series, split_tasks

DPI = 100
TAMPER_SIZE = (11.0, 4.5)  # inches: 1100 x 450 pixels
TRADEOFF_SIZE = (6.0, 5.0)  # 600 x 500 pixels
ROBUSTNESS_SIZE = (9.0, 5.5)  # 900 x 550 pixels
TRAINING_CURVES_SIZE = TAMPER_SIZE  # the same two panels: forget left, kept right
LENS_KL_SIZE = (6.0, 4.0)
PROFILE_SIZE = (8.4, 4.8)
HALF_STYLE = {ATTACKED: "-", HELDOUT: "--"}
KEPT_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")  # one per kept task, in the trade-off and training curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Save at the figure's own size (at `DPI`) and close it, atomically."""
    _pyplot()
    return save_figure_atomic(fig, path, DPI)


def _series(results: dict, task: str, metric: str) -> tuple[list[int], list[float]]:
    """Steps and accuracies in percent."""
    points = series(results, task, metric)
    return [s for s, _ in points], [100 * v for _, v in points]


def plot_lens_kl(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """KL from the model's output to the logit lens and to the tuned lens, by layer (`lens eval`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=LENS_KL_SIZE, dpi=DPI)
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["logit_lens_kl"] for r in rows], marker="o", label="logit lens")
    ax.plot(layers, [r["tuned_lens_kl"] for r in rows], marker="o", label="tuned lens")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(model || lens) [nats]")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_profile(profile: dict, path: str | Path, title: str = "") -> Path:
    """Knowledge profile: accuracy through each layer's lens, per task (model output and chance dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=PROFILE_SIZE, dpi=DPI)
    for name, entry in profile["tasks"].items():
        (line,) = ax.plot(profile["layers"], entry["acc"], marker="o", markersize=3, label=name)
        ax.axhline(entry["final_acc"], color=line.get_color(), linestyle=":", linewidth=1)
    if profile.get("chance") is not None:
        ax.axhline(profile["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("layer (lens l reads the input of block l)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title or "knowledge profile through the tuned lens (dotted: model output)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _reference_lines(ax, results: dict, tasks: Sequence[str], metric: str, colors: dict[str, str]) -> None:
    chance = results.get("chance")
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1.2, label=f"chance ({100 * chance:.0f}%)")
    drawn: set[float] = set()
    for task in tasks:
        original = (results.get("original") or {}).get(task, {})
        value = original.get(metric)
        if value is None or round(value, 6) in drawn:
            continue
        drawn.add(round(value, 6))
        measured = original.get("task", task)  # a held-out half's line may be the whole task's accuracy
        what = half(measured) + " half" if half(measured) else measured
        ax.axhline(100 * value, color=colors.get(task, "black"), linestyle="-.", linewidth=1.0, alpha=0.7,
                   label=f"original model, {what} ({100 * value:.1f}%)")


def _style_axes(ax, metric: str, legend_size: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"{metric} [%]")
    ax.set_ylim(-2, 102)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size, loc="best")


def plot_tamper(results: dict, path: str | Path, metric: str = "acc", title: str | None = None) -> Path:
    """Forget accuracy against step (left; attacked and held-out halves) and the kept tasks' accuracy (right)."""
    plt = _pyplot()
    forget, retain = split_tasks(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=TAMPER_SIZE, dpi=DPI)
    colors = {}
    text = []
    for task in forget:
        steps, values = _series(results, task, metric)
        (line,) = left.plot(steps, values, marker="o", linestyle=HALF_STYLE.get(half(task), "-"), label=task)
        colors[task] = line.get_color()
        if values:
            text.append(f"{half(task) or task}: {values[0]:.2f}% -> {values[-1]:.2f}% "
                        f"({values[-1] - values[0]:+.2f} pts)")
    _reference_lines(left, results, forget, metric, colors)
    left.set_title("forget accuracy; recovery (last - first):\n" + "\n".join(text), fontsize=9)
    for task in retain:
        steps, values = _series(results, task, metric)
        (line,) = right.plot(steps, values, marker="o", label=task)
        colors[task] = line.get_color()
    _reference_lines(right, results, retain, metric, colors)
    right.set_title("kept tasks")
    for ax in (left, right):
        _style_axes(ax, metric, 8)
    fig.suptitle(title or tamper_title(results))
    fig.tight_layout()
    return save_figure(fig, path)


def tamper_title(results: dict) -> str:
    """The attack's one-line title: what was attacked (the run; `model` in results of older versions), lr,
    schedule and corpus size."""
    cfg = results.get("config", {})
    attacked = cfg.get("run") or cfg.get("model") or "?"
    return (f"tamper attack on {Path(str(attacked)).name}: lr {cfg.get('lr')}, {cfg.get('schedule', '?')}, "
            f"{cfg.get('chunks', '?')} chunks")


def plot_tamper_comparison(runs: Sequence[tuple[str, dict]], path: str | Path, metric: str = "acc",
                           title: str | None = None) -> Path:
    """Several attacks in one figure: forget accuracy (left) and the kept tasks' accuracy (right) against step."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=TAMPER_SIZE, dpi=DPI)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, results) in enumerate(runs):
        color = cycle[index % len(cycle)]
        forget, retain = split_tasks(results)
        for task in forget:
            steps, values = _series(results, task, metric)
            name = f"{label} {half(task) or ''}".strip()
            gain = values[-1] - values[0] if values else None
            left.plot(steps, values, color=color, linestyle=HALF_STYLE.get(half(task), "-"), marker="o",
                      markersize=3, label=f"{name} ({gain:+.2f} pts)" if gain is not None else name)
        for task in retain:
            steps, values = _series(results, task, metric)
            right.plot(steps, values, color=color, marker="o", markersize=3, label=f"{label} {task}")
    if runs:
        first = runs[0][1]
        forget, retain = split_tasks(first)
        _reference_lines(left, first, forget, metric, {})
        _reference_lines(right, first, retain, metric, {})
    left.set_title("forget accuracy (solid: attacked, dashed: held out)")
    right.set_title("kept tasks")
    for ax in (left, right):
        _style_axes(ax, metric, 7)
    fig.suptitle(title or "tamper attacks compared (recovery = last - first)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_tradeoff(points: Sequence[tuple[str, float | None, Mapping[str, float | None]]], path: str | Path,
                  baseline: tuple[float | None, Mapping[str, float | None]] | None = None,
                  chance: float | None = None, forget_label: str = "forget",
                  kept_labels: Sequence[str] = ()) -> Path:
    """Forget accuracy (x) against the accuracy on each kept task (y): one colour per run, one marker per
    kept task, so every kept task is on the plot; the baseline (black) and chance marked. `points` holds
    (run, forget accuracy, {kept task: accuracy}); a run or task not measured yet is left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=TRADEOFF_SIZE, dpi=DPI)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tasks = list(kept_labels)
    for k, task in enumerate(tasks):  # the legend: one entry per kept task, by its marker
        ax.scatter([], [], marker=KEPT_MARKERS[k % len(KEPT_MARKERS)], color="grey", label=task)
    for index, (label, forget, kept) in enumerate(points):
        drawn = [(k, kept[t]) for k, t in enumerate(tasks) if forget is not None and kept.get(t) is not None]
        for k, value in drawn:
            ax.scatter([100 * forget], [100 * value], s=30, zorder=3, color=cycle[index % len(cycle)],
                       marker=KEPT_MARKERS[k % len(KEPT_MARKERS)])
        if drawn:
            ax.annotate(label, (100 * forget, 100 * drawn[0][1]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    if baseline is not None and baseline[0] is not None:
        for k, task in enumerate(tasks):
            if baseline[1].get(task) is not None:
                ax.scatter([100 * baseline[0]], [100 * baseline[1][task]], marker=KEPT_MARKERS[k % len(KEPT_MARKERS)],
                           s=110, color="black", zorder=4, label="baseline (original model)" if k == 0 else None)
    if chance is not None:
        ax.axvline(100 * chance, color="grey", linestyle=":", label=f"chance ({100 * chance:.0f}%)")
        ax.axhline(100 * chance, color="grey", linestyle=":")
    ax.set_xlabel(f"{forget_label} accuracy [%] (lower is better)")
    kept_name = tasks[0] if len(tasks) == 1 else "kept-task"
    ax.set_ylabel(f"{kept_name} accuracy [%] (higher is better)")
    ax.set_title("unlearning trade-off" + (" (marker: kept task)" if len(tasks) > 1 else ""))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


# the curves of one robustness run: solid the best attack, dashed the base model, dotted the floor
ROBUSTNESS_STYLE = {"best attack": ("-", "o"), "base model": ("--", "s"), "floor": (":", "v")}


def plot_robustness_comparison(runs: Sequence[tuple[str, dict]], path: str | Path) -> Path:
    """Unseen-half accuracy against attack steps, one colour per robustness run: the envelope over its
    grid, the base model attacked the same way and the fictional-facts floor, each shaded ± sd over
    seeds where there were several, so runs (and their grids) compare in one figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=ROBUSTNESS_SIZE, dpi=DPI)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, result) in enumerate(runs):
        color = cycle[index % len(cycle)]
        failing = "; fails capability" if capability(result) == "fails" else ""
        for name, (steps, means, sds) in unseen_curves(result).items():
            style, marker = ROBUSTNESS_STYLE[name]
            ys = [100 * m if m is not None else float("nan") for m in means]
            ax.plot(steps, ys, color=color, linestyle=style, marker=marker, markersize=4,
                    label=f"{label}: {name}" + (f" ({result['grid']} grid{failing})" if name == "best attack" else ""))
            if any(sd is not None for sd in sds):
                spread = [100 * (sd or 0.0) for sd in sds]
                ax.fill_between(steps, [y - d for y, d in zip(ys, spread)], [y + d for y, d in zip(ys, spread)],
                                color=color, alpha=0.12, linewidth=0)
    chance = runs[0][1].get("chance") if runs else None
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1.2, label=f"chance ({100 * chance:.0f}%)")
    ax.set_title("unseen-half accuracy under relearning attacks\n"
                 "solid: best attack over the grid; dashed: base model attacked; dotted: fictional-facts floor",
                 fontsize=10)
    _style_axes(ax, "unseen-half accuracy", 7)
    ax.set_xlabel("attack steps (0: before the attack)")
    counts = sorted({n for _, result in runs for n in result["steps"]})
    if counts and counts[-1] > 10 * counts[0]:  # 8 ... 512: spread the short attacks out, linear up to the first
        ax.set_xscale("symlog", linthresh=counts[0], linscale=0.5)
    ax.set_xticks([0, *counts], [str(n) for n in [0, *counts]])
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training_curves(runs: Sequence[tuple[str, dict[str, tuple[list[int], list[float]]]]], forget_task: str,
                         path: str | Path, metric: str = "acc") -> Path:
    """Accuracy against optimiser step during unlearning, one colour per run: the forget task on the
    left (where forgetting happens), each other task on the right, told apart by marker (where
    collateral damage starts). `runs` holds (label, {task: (steps, accuracies)})."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=TRAINING_CURVES_SIZE, dpi=DPI)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    kept = sorted({task for _, curves in runs for task in curves if task != forget_task})
    for index, (label, curves) in enumerate(runs):
        color = cycle[index % len(cycle)]
        if forget_task in curves:
            steps, values = curves[forget_task]
            left.plot(steps, [100 * v for v in values], color=color, marker="o", markersize=3, label=label)
        for task in kept:
            if task in curves:
                steps, values = curves[task]
                right.plot(steps, [100 * v for v in values], color=color, markersize=4, label=f"{label}: {task}",
                           marker=KEPT_MARKERS[kept.index(task) % len(KEPT_MARKERS)])
    left.set_title(f"forget: {forget_task}")
    right.set_title("kept: " + ", ".join(kept) if len(kept) <= 3 else f"kept: {len(kept)} tasks (markers)")
    for ax in (left, right):
        _style_axes(ax, metric, 7)
    fig.suptitle("accuracy during unlearning (step 0: before unlearning)")
    fig.tight_layout()
    return save_figure(fig, path)


PHRASING_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:gray")


PAPER_COLORS = ("black", "tab:cyan", "tab:olive")  # apart from PHRASING_COLORS


def plot_robustness(result: Mapping, path: str | Path) -> Path:
    """Unseen-half accuracy against attack steps: each grid attack faint, the envelope, the base
    model attacked, the benign attack and the fictional floor; chance and the base model dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=TAMPER_SIZE, dpi=DPI)
    xs = [0, *result["steps"]]

    def curve(start: float | None, points: Mapping, key: str = UNSEEN) -> list[float]:
        values = [start] + [points.get(str(n), {}).get(key) if isinstance(points.get(str(n)), Mapping)
                            else points.get(str(n)) for n in result["steps"]]
        return [100 * v if is_number(v) else math.nan for v in values]

    start = result["unlearned"][UNSEEN]
    for attack in result["attacks"].values():
        ax.plot(xs, curve(start, attack["steps"]), color="tab:blue", alpha=0.25, linewidth=1)
    ax.plot(xs, curve(start, result["envelope"]), color="tab:blue", linewidth=2.5, marker="o",
            label="best attack (envelope over the grid)")
    ax.plot(xs, curve(result["base"][UNSEEN], result["base_model_envelope"]), color="tab:green", marker="s",
            label="base model, attacked the same way")
    ax.plot(xs, curve(start, result["benign"]["steps"]), color="tab:orange", marker="^", label="benign attack")
    ax.plot(xs, curve(result["floor"].get("0"), result["floor"]), color="tab:red", marker="v",
            label="floor: fictional facts, unseen half")
    for k, (name, paper) in enumerate((result.get("paper_attacks") or {}).items()):  # each paper's own attack
        ax.plot(xs, curve(start, paper.get("steps") or {}), color=PAPER_COLORS[k % len(PAPER_COLORS)],
                linestyle="-.", marker="x", label=f"{name} paper's own attack")
    # another phrasing is measured before the attacks and after their last step only: a straight
    # segment from the unlearned model to the most any grid attack recovered in that phrasing
    for k, (name, row) in enumerate((result.get("phrasings") or {}).items()):
        color = PHRASING_COLORS[k % len(PHRASING_COLORS)]
        ends = [row.get("unlearned"), row.get("envelope")]
        ys = [100 * e[UNSEEN] if isinstance(e, Mapping) and is_number(e.get(UNSEEN)) else math.nan for e in ends]
        ax.plot([0, xs[-1]], ys, color=color, linestyle="--", marker="D",
                label=f"asked as {name}: unlearned, then best attack")
    ax.axhline(100 * result["chance"], color="grey", linestyle=":", linewidth=1.2, label="chance")
    ax.axhline(100 * result["base"][UNSEEN], color="tab:green", linestyle=":", linewidth=1.2,
               label="base model, not attacked")
    ax.set_xlabel("attack steps")
    ax.set_ylabel("unseen-half accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"robustness of the unlearned model ({result['grid']} grid; faint: each grid attack)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


LOCATE_WIDTH, LOCATE_ROW = 0.28, 0.9  # inches per block, per component row (30 blocks: 1000 x 330 pixels)


def plot_locate(result: Mapping, path: str | Path, title: str = "") -> Path:
    """`locate`'s heat map: the recovered share of each block's MLP and attention (blocks across), the band
    marked on the MLP row."""
    plt = _pyplot()
    shares = result["recovered_share"]
    components = list(shares)
    blocks = len(shares[components[0]])
    labels = {"mlp": "MLP", "attn": "attention"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + LOCATE_WIDTH * blocks), 1.4 + LOCATE_ROW * len(components)),
                           dpi=DPI)
    grid = [[math.nan if v is None else v for v in shares[c]] for c in components]  # not traced: blank
    top = max(0.05, max(v for row in grid for v in row if not math.isnan(v)))
    image = ax.imshow(grid, aspect="auto", cmap="Purples", vmin=0.0, vmax=top, interpolation="nearest")
    ax.set_yticks(range(len(components)), [labels.get(c, c) for c in components])
    step = 1 if blocks <= 16 else 2
    ax.set_xticks(range(0, blocks, step))
    ax.set_xlabel("block")
    first, last = result["band"]
    row = components.index(result.get("band_component", "mlp"))
    ax.add_patch(plt.Rectangle((first - 0.5, row - 0.5), last - first + 1, 1, fill=False, edgecolor="darkorange",
                               linewidth=2.0))
    facts = result.get("facts", {}).get("traced")
    stream = result.get("corrupt_stream", 0)
    noised = "embeddings" if stream == 0 else f"stream {stream}"
    ax.set_title(f"{title}\nshare of the answer's probability restored per block (subject's {noised} noised; band "
                 f"{first}-{last}{f', {facts} facts' if facts else ''})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.22 if len(components) > 1 else 0.3, top=0.78)
    return save_figure(fig, path)


SEARCH_SIZE = (11.0, 4.8)  # 1100 x 480 pixels: the trade-off left, what came back right


def plot_search(summary: Mapping, path: str | Path) -> Path:
    """A `search` at a glance, one colour per finished point (its rank in the label). Left: forget accuracy
    against the worst kept domain's share of its base accuracy, the targets dashed, so the points that forget
    enough without breaking a domain sit in the top-left corner. Right (`--measure robustness`): each point's
    unseen half before the attack, after the largest attack (the envelope) and under the fictional-facts
    floor, joined by a line whose length is what the attack brought back. A point that lost general ability
    (a kept domain or the perplexity past its target) is drawn hollow."""
    plt = _pyplot()
    robust = summary["measure"] == "robustness"
    fig, axes = plt.subplots(1, 2 if robust else 1, figsize=SEARCH_SIZE if robust else TRADEOFF_SIZE, dpi=DPI,
                             squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    finished = [r for r in summary["points"] if r.get("status") == "finished"]
    targets = summary["targets"]
    left = axes[0][0]
    for index, record in enumerate(finished):
        color = cycle[index % len(cycle)]
        face = "none" if record.get("ability") == "lost" else color
        metrics = record["metrics"]
        shares = [k["ratio"] for k in metrics["kept"].values() if k.get("ratio") is not None]
        worst = min(shares) if shares else float("nan")
        left.scatter([100 * metrics["forget"]["acc"]], [100 * worst], s=60, zorder=3, edgecolors=color,
                     facecolors=face, label=f"{record['rank']}. {record['name']}")
    left.axvline(100 * targets["forget"], color="grey", linestyle="--", linewidth=1)
    left.axhline(100 * targets["kept"], color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("forget accuracy [%] (lower is better)")
    left.set_ylabel("worst kept domain [% of base] (higher is better)")
    left.set_title("forgetting against what was kept\ndashed: targets; hollow: general ability lost", fontsize=10)
    left.grid(alpha=0.3)
    if finished:
        left.legend(fontsize=7, loc="best")
    if robust:
        right = axes[0][1]
        robust_points = [(i, r) for i, r in enumerate(finished) if r["metrics"].get("robustness")]
        for x, (index, record) in enumerate(robust_points):
            color = cycle[index % len(cycle)]
            face = "none" if record.get("ability") == "lost" else color
            r = record["metrics"]["robustness"]
            before, after, floor = r.get("unlearned_unseen"), r.get("envelope"), r.get("floor")
            if before is not None and after is not None:
                right.plot([x, x], [100 * before, 100 * after], color=color, linewidth=2, zorder=2)
            if before is not None:
                right.scatter([x], [100 * before], marker="o", s=50, zorder=3, edgecolors=color, facecolors=face,
                              label="unlearned" if x == 0 else None)
            if after is not None:
                right.scatter([x], [100 * after], marker="^", s=70, zorder=3, edgecolors=color, facecolors=face,
                              label=f"after {r.get('steps')} attack steps (envelope)" if x == 0 else None)
            if floor is not None:
                right.scatter([x], [100 * floor], marker="_", s=200, zorder=3, color="grey",
                              label="fictional-facts floor" if x == 0 else None)
            if r.get("base_unseen") is not None:
                right.scatter([x], [100 * r["base_unseen"]], marker="*", s=70, zorder=3, color="black",
                              label="base model" if x == 0 else None)
        right.set_xticks(range(len(robust_points)), [f"{r['rank']}. {r['name']}" for _, r in robust_points],
                         rotation=20, ha="right", fontsize=7)
        right.set_xlim(-0.5, max(len(robust_points), 1) - 0.5)
        right.set_ylim(0, 105)
        right.set_ylabel("unseen-half accuracy [%]")
        right.set_title("what the attack brought back\n(the line: unlearned to envelope)", fontsize=10)
        right.grid(alpha=0.3, axis="y")
        if robust_points:
            right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
