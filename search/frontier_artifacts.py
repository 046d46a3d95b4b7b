"""A search's frontier artifacts: frontier.csv, frontier.png (matplotlib) and an interactive frontier.html (plotly)."""
from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

from search.states import COMPLETE, FAILED, INFEASIBLE, PRUNED
from search.tracking import ui_url

# One colour and marker per state, the same in the PNG and the HTML.
STYLE = {
    COMPLETE: ("#1f77b4", "o", "circle", "complete"),
    PRUNED: ("#ff7f0e", "v", "triangle-down", "pruned (AP when the scheduler stopped it)"),
    FAILED: ("#d62728", "X", "x", "failed (drawn at AP 0 if it reported none)"),
    INFEASIBLE: ("#7f7f7f", "s", "square-open", "infeasible (over budget, not trained; drawn at AP 0)"),
}
FRONT_COLOUR = "#2ca02c"
X_LABEL = "GFLOPs per image (billions of multiply-adds)"
Y_LABEL = "COCO AP@[.5:.95], validation split"


def write_artifacts(folder: Path, trials: list, front: list, experiment_id: str, title: str) -> list[Path]:
    on_front = {p.run_id for p in front}
    paths = [folder / "frontier.csv", folder / "frontier.png", folder / "frontier.html"]
    paths[0].write_text(frontier_csv(trials, on_front))
    plot_png(trials, front, paths[1], title)
    paths[2].write_text(frontier_html(trials, front, experiment_id, title))
    return paths


def _ap(p) -> float:
    return 0.0 if math.isnan(p.map) else p.map


def frontier_csv(trials: list, on_front: set[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run_id", "run_name", "state", "map", "map50", "gflops", "params_m", "enqueued", "frontier",
                     "reason"])
    for p in sorted(trials, key=lambda p: (math.isnan(p.gflops), p.gflops, p.run_name)):
        writer.writerow([p.run_id, p.run_name, p.state, _number(p.map, 4), _number(p.map50, 4),
                         _number(p.gflops, 4), _number(p.params_m, 3), p.enqueued,
                         str(p.run_id in on_front).lower(), p.reason])
    return out.getvalue()


def _number(value: float, digits: int) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def _drawn(trials: list, state: str) -> list:
    return [p for p in trials if p.state == state and not math.isnan(p.gflops)]


def plot_png(trials: list, front: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    for state, (colour, marker, _, label) in STYLE.items():
        points = _drawn(trials, state)
        if points:
            hollow = state == INFEASIBLE
            ax.scatter([p.gflops for p in points], [_ap(p) for p in points], marker=marker, s=36,
                       c="none" if hollow else colour, edgecolors=colour, label=f"{label}: {len(points)}", zorder=3)
    ordered = sorted(front, key=lambda p: p.gflops)
    if ordered:
        # A step: the best AP reachable within each budget holds until the next frontier point.
        ax.step([p.gflops for p in ordered], [p.map for p in ordered], where="post", c=FRONT_COLOUR, lw=1.8,
                label=f"frontier: {len(ordered)}", zorder=2)
    for p in trials:
        if p.enqueued and not math.isnan(p.gflops):
            ax.scatter([p.gflops], [_ap(p)], marker="*", s=180, facecolors="none", edgecolors="black", zorder=4)
            ax.annotate(p.enqueued, (p.gflops, _ap(p)), textcoords="offset points", xytext=(6, 6), fontsize=8)
    costs = [p.gflops for p in trials if not math.isnan(p.gflops)]
    if costs and min(costs) > 0 and max(costs) / min(costs) > 20:
        ax.set_xscale("log")  # D0 to D7 span two orders of magnitude
    ax.margins(x=0.08, y=0.08)  # room for the labels of the points at the ends
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        # Beside the axes, not over the points: with few trials, any corner of the plot may hold one.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    undrawn = {state: sum(p.state == state and math.isnan(p.gflops) for p in trials) for state in STYLE}
    note = ", ".join(f"{count} {state}" for state, count in undrawn.items() if count)
    if note:
        fig.text(0.01, 0.01, f"not drawn (no GFLOPs recorded): {note}", fontsize=7, color="#555555")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_link(experiment_id: str, run_id: str) -> str:
    # The MLflow UI's route to a run, from the server's root (where `effsearch ui` and `mlflow server` serve it).
    return ui_url("", experiment_id, run_id)


def frontier_html(trials: list, front: list, experiment_id: str, title: str) -> str:
    """One self-contained page (plotly's script inlined: the UI may be offline): hover names a run and its AP and
    GFLOPs, a click opens the run in the MLflow UI, and a table of the frontier links each run too."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for state, (colour, _, symbol, label) in STYLE.items():
        points = _drawn(trials, state)
        if not points:
            continue
        fig.add_trace(go.Scatter(
            x=[p.gflops for p in points], y=[_ap(p) for p in points], mode="markers", name=label,
            marker=dict(color=colour, symbol=symbol, size=9),
            customdata=[[run_link(experiment_id, p.run_id), p.run_name, p.state, p.enqueued] for p in points],
            hovertemplate="<b>%{customdata[1]}</b><br>AP %{y:.3f}<br>%{x:.3f} GFLOPs<br>%{customdata[2]} "
                          "%{customdata[3]}<extra></extra>"))
    ordered = sorted(front, key=lambda p: p.gflops)
    if ordered:
        fig.add_trace(go.Scatter(x=[p.gflops for p in ordered], y=[p.map for p in ordered], mode="lines",
                                 line=dict(shape="hv", color=FRONT_COLOUR), name="frontier", hoverinfo="skip"))
    # The legend above the plot: shown in MLflow's narrow artifact frame, one at the side took half the width.
    # The page's heading is the title: a plotly title under the legend overlapped it.
    fig.update_layout(xaxis_title=X_LABEL, yaxis_title=Y_LABEL, template="plotly_white", height=520,
                      margin=dict(t=90), legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    # Plotly's own click event: open the run a point stands for.
    click = ("var plot = document.getElementById('{plot_id}'); plot.on('plotly_click', function (event) {"
             " var link = event.points[0].customdata && event.points[0].customdata[0];"
             " if (link) { window.open(link, '_blank'); } });")
    plot = fig.to_html(full_html=False, include_plotlyjs=True, post_script=click, div_id="frontier")
    rows = "".join(
        f"<tr><td><a href='{run_link(experiment_id, p.run_id)}' target='_blank'>{html.escape(p.run_name)}</a></td>"
        f"<td>{p.map:.3f}</td><td>{p.gflops:.3f}</td><td>{p.params_m:.2f}</td></tr>" for p in ordered)
    counts = ", ".join(f"{sum(p.state == s for p in trials)} {s}" for s in STYLE)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>effsearch frontier</title></head>"
            f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2><p>{len(trials)} trials: {counts}. "
            f"{len(ordered)} on the frontier. Click a point to open its run.</p>{plot}"
            "<table border='1' cellpadding='4' style='border-collapse:collapse'>"
            "<tr><th>frontier run</th><th>AP</th><th>GFLOPs</th><th>params (M)</th></tr>"
            f"{rows}</table></body></html>")
