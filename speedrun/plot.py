"""comparison.png: every run's validation curve against tokens and against training time and, for a sweep
over one or two keys, the final metric against the first key.

Readability rules: every job has its own look (colour, line style, marker); the curve panels include the
step-0 evaluation, so that a short run does not enter from the top edge, and when that untrained loss
squeezes the rest of training flat, a second row zooms on the second half, where runs differ; the legend
names each job by its differing overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed, and none may exist (SSH, SLURM)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import EngFormatter  # noqa: E402

from speedrun.callbacks import natural_key  # noqa: E402

COLOURS = plt.get_cmap("tab10").colors
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = (".", "x", "+", "^", "s")
PANEL_INCHES = (6.0, 4.5)
LEGEND_ROW_INCHES = 0.22
DPI = 110
REACH_LINE = {"color": "0.3", "linestyle": (0, (1, 3)), "linewidth": 1}


@dataclass(frozen=True)
class Style:
    colour: tuple[float, float, float]
    line_style: str
    marker: str


@dataclass
class Curve:
    """One job's evaluations, in order."""

    label: str
    tokens: list[float]
    seconds: list[float]
    values: list[float]


@dataclass
class FinalPoint:
    """A completed job's final metric, at its value of the first swept key (and the second, if any)."""

    x: str
    series: str | None
    value: float


@dataclass
class FinalPanel:
    """The third panel: final `metric` against `key`, one line per value of `series_key`."""

    points: list[FinalPoint]
    key: str
    series_key: str | None
    metric: str


def cyclic_style(index: int) -> Style:
    """The index-th look: the ten colours in turn, then the next line style, then the next marker (40
    distinct looks before markers change, 200 before anything repeats)."""
    colours, styles = len(COLOURS), len(LINE_STYLES)
    return Style(
        COLOURS[index % colours],
        LINE_STYLES[index // colours % styles],
        MARKERS[index // (colours * styles) % len(MARKERS)],
    )


def assign_styles(keys: list[str], rows: list[tuple]) -> list[Style]:
    """A distinct look for each job, given each job's values of the keys that vary between jobs.

    When one key with 2-4 values (preferably `seed`) leaves at most 10 combinations of the other keys,
    colour follows those combinations and line style that key, so the legend reads as a grid (a
    4-setting x 3-seed sweep: 4 colours, 3 line styles). Otherwise, and when two jobs share all values,
    jobs take the cyclic looks in order.
    """
    if len(keys) >= 2 and len(set(rows)) == len(rows):
        candidates = []
        for position, key in enumerate(keys):
            values = sorted({row[position] for row in rows}, key=lambda v: natural_key(str(v)))
            others = list(dict.fromkeys(row[:position] + row[position + 1 :] for row in rows))
            if 2 <= len(values) <= len(LINE_STYLES) and len(others) <= len(COLOURS):
                candidates.append((key != "seed", len(values), -position, position, values, others))
        if candidates:
            *_, position, values, others = min(candidates)
            return [
                Style(
                    COLOURS[others.index(row[:position] + row[position + 1 :])],
                    LINE_STYLES[values.index(row[position])],
                    MARKERS[0],
                )
                for row in rows
            ]
    return [cyclic_style(index) for index in range(len(rows))]


def draw_curves(
    axis, xs: list[list[float]], curves: list[Curve], styles: list[Style], labelled: bool
) -> None:
    for x, curve, style in zip(xs, curves, styles, strict=True):
        axis.plot(
            x,
            curve.values,
            color=style.colour,
            linestyle=style.line_style,
            marker=style.marker,
            markersize=4,
            label=curve.label if labelled else None,
        )


@dataclass(frozen=True)
class Zoom:
    """The region a zoomed panel shows: x from `left` to `right`, y from `bottom` to `top`."""

    left: float
    right: float
    bottom: float
    top: float


def second_half_zoom(xs: list[list[float]], curves: list[Curve]) -> Zoom | None:
    """The second half of the x-range, fitted to the values there, when the full y-range (set by the
    untrained step-0 loss) squeezes them into under 40% of the panel's height; else None."""
    right = max(max(x) for x in xs)
    left = right / 2
    inside = []
    for x, curve in zip(xs, curves, strict=True):
        inside += [value for position, value in zip(x, curve.values, strict=True) if position >= left]
        if x[0] < left < x[-1]:  # where the line enters the zoomed region
            inside.append(interpolate(left, x, curve.values))
    everything = [value for curve in curves for value in curve.values]
    full = max(everything) - min(everything)
    if len(inside) < 2 or full == 0 or max(inside) - min(inside) > 0.4 * full:
        return None
    pad = 0.08 * (max(inside) - min(inside)) or 0.01 * abs(max(inside)) or 0.01
    return Zoom(left, right + 0.02 * (right - left), min(inside) - pad, max(inside) + pad)


def interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """The polyline (xs, ys) at x, for x within xs."""
    for (x0, y0), (x1, y1) in pairwise(zip(xs, ys, strict=True)):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def draw_final_vs_swept(axis, panel: FinalPanel) -> None:
    """The final metric against the first swept key; with a second swept key, one line per value of it.
    Several seeds per value: the dots are the runs, the line joins their means."""
    points, key, series_key, metric = panel.points, panel.key, panel.series_key, panel.metric
    try:
        xs_of = {point.x: float(point.x) for point in points}
    except ValueError:  # categorical values (model=small,medium): evenly spaced, in natural order
        categories = sorted({point.x for point in points}, key=natural_key)
        xs_of = {x: float(categories.index(x)) for x in categories}
        axis.set_xticks(range(len(categories)), categories, rotation=30)
    else:
        values = list(xs_of.values())
        if values and min(values) > 0 and max(values) > 10 * min(values):
            axis.set_xscale("log")
            axis.minorticks_off()
        if len(set(values)) <= 8:  # ticks at the swept values, written as on the command line
            ticks = {value: text for text, value in sorted(xs_of.items(), reverse=True)}
            axis.set_xticks(list(ticks), list(ticks.values()))
    series = sorted({point.series for point in points}, key=lambda s: natural_key(str(s)))
    for index, name in enumerate(series):
        by_x: dict[float, list[float]] = {}
        for point in points:
            if point.series == name:
                by_x.setdefault(xs_of[point.x], []).append(point.value)
        style = cyclic_style(index)
        label = f"{series_key}={name}" if series_key else None
        ordered = sorted(by_x)
        axis.plot(
            ordered,
            [sum(by_x[x]) / len(by_x[x]) for x in ordered],
            color=style.colour,
            linestyle=style.line_style,
            label=label,
        )
        dots = [(x, y) for x, ys in by_x.items() for y in ys]
        axis.scatter([x for x, _ in dots], [y for _, y in dots], alpha=0.6, color=style.colour)
    if series_key and points:
        axis.legend(fontsize="small")
    axis.set_xlabel(key)
    axis.set_ylabel(f"final {metric}")
    axis.set_title(f"final {metric} vs {key}")
    axis.grid(alpha=0.3)


def comparison_figure(
    curves: list[Curve],
    styles: list[Style],
    curve_metric: str,
    final: FinalPanel | None = None,
    reach: float | None = None,
):
    """The figure: `curve_metric` against tokens and against training time, one line per curve in its
    style (a second row zooms on the second half of training when needed), a dotted line at `reach` if
    given, and the `final` panel on the right if given. The caller saves it.

    Axes, in order: the curves against tokens and against time, then the zoomed ones, then `final`.
    """
    drawn = [(curve, style) for curve, style in zip(curves, styles, strict=True) if curve.values]
    kept_curves, kept_styles = [curve for curve, _ in drawn], [style for _, style in drawn]
    xs_of = {x: [getattr(curve, x) for curve in kept_curves] for x in ("tokens", "seconds")}
    zooms = {x: second_half_zoom(xs, kept_curves) if kept_curves else None for x, xs in xs_of.items()}
    rows = 2 if any(zooms.values()) else 1
    columns = 3 if final else 2
    labels = [curve.label for curve in kept_curves]
    width = PANEL_INCHES[0] * columns
    # One legend below the panels, in as many columns as the longest label allows.
    legend_columns = max(1, min(len(labels), int(width / (0.075 * max(map(len, labels), default=1) + 0.7))))
    legend_inches = (math.ceil(len(labels) / legend_columns) * LEGEND_ROW_INCHES + 0.15) if labels else 0.0
    height = PANEL_INCHES[1] * rows + legend_inches
    figure = plt.figure(figsize=(width, height))
    grid = figure.add_gridspec(rows, columns)
    x_labels = {"tokens": "tokens", "seconds": "training time (s)"}
    for row in range(rows):
        for column, x in enumerate(("tokens", "seconds")):
            axis = figure.add_subplot(grid[row, column])
            axis.set_xlabel(x_labels[x])
            axis.set_ylabel(curve_metric)
            axis.grid(alpha=0.3)
            if x == "tokens":  # 300k, 1.2M rather than an offset such as 1e6 in the corner
                axis.xaxis.set_major_formatter(EngFormatter(sep=""))
            title = f"{curve_metric} vs {x_labels[x].removesuffix(' (s)')}"
            if not drawn:
                axis.set_title(title)
                axis.text(
                    0.5,
                    0.5,
                    f"no {curve_metric} records in metrics.jsonl",
                    ha="center",
                    transform=axis.transAxes,
                )
                continue
            draw_curves(axis, xs_of[x], kept_curves, kept_styles, labelled=row == 0 and x == "tokens")
            if reach is not None:
                axis.axhline(reach, **REACH_LINE)
            zoom = zooms[x]
            if row == 0:
                axis.set_title(title)
                if zoom:  # outline the region the row below shows
                    axis.indicate_inset(
                        (zoom.left, zoom.bottom, zoom.right - zoom.left, zoom.top - zoom.bottom),
                        edgecolor="0.5",
                    )
            elif zoom:
                axis.set_title(f"{title}: second half, zoomed")
                axis.set_xlim(zoom.left, zoom.right)
                axis.set_ylim(zoom.bottom, zoom.top)
            else:  # the other x-axis needs a zoom, this one does not: leave its row empty
                axis.remove()
    if drawn:
        handles, names = figure.axes[0].get_legend_handles_labels()
        figure.legend(
            handles, names, loc="lower center", ncol=legend_columns, fontsize="small", frameon=False
        )
    if final:
        draw_final_vs_swept(figure.add_subplot(grid[:, 2]), final)
    figure.tight_layout(rect=(0, legend_inches / height, 1, 1))
    return figure


def save_figure(figure, path) -> None:
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
