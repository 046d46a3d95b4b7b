"""The frontier of an experiment's finished, full-budget trials: tags, table, plot and CSV/HTML artifacts."""
from __future__ import annotations

import csv
import html
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from search.pareto import hypervolume, pareto_front
from search.tracking import FRONTIER_TAG, FULL_BUDGET_TAG


@dataclass(frozen=True)
class TrialPoint:
    run_id: str
    run_name: str
    map: float
    map50: float
    gflops: float
    params_m: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class FrontierError(LookupError):
    pass


def finished_trials(client: MlflowClient, experiment_id: str) -> list[TrialPoint]:
    """Child runs that finished every epoch: only full-budget results may reach the frontier."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{FULL_BUDGET_TAG}` = 'true' and attributes.status = 'FINISHED'",
        max_results=10_000)
    points = []
    for run in runs:
        m = run.data.metrics
        if "map" in m and "gflops" in m:
            points.append(TrialPoint(run.info.run_id, run.info.run_name, m["map"], m.get("map50", 0.0),
                                     m["gflops"], m.get("params_m", 0.0)))
    return points


def experiment_id_for(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise FrontierError(f"no experiment named {name!r} in {client.tracking_uri} (known: {known})")
    return experiment.experiment_id


def compute_frontier(points: list[TrialPoint]) -> list[TrialPoint]:
    return [points[i] for i in pareto_front([(p.map, p.gflops) for p in points])]


# The hypervolume's reference point is (AP 0, REFERENCE_GFLOPS): the search's max_gflops when it has one, else
# this factor times the costliest finished trial (then logged beside it, since it moves as trials finish).
REFERENCE_SLACK = 1.1


def reference_gflops(points: list[TrialPoint], max_gflops: float | None) -> float:
    return max_gflops if max_gflops else REFERENCE_SLACK * max((p.gflops for p in points), default=0.0)


def record_frontier(client: MlflowClient, experiment_id: str, parent_run_id: str | None,
                    max_gflops: float | None = None) -> list[TrialPoint]:
    """Tag frontier=true/false on every finished trial, and on the parent run attach the frontier artifacts and
    log the frontier's size, best AP and hypervolume, at a step that counts the finished trials."""
    points = finished_trials(client, experiment_id)
    front = compute_frontier(points)
    on_front = {p.run_id for p in front}
    for p in points:
        client.set_tag(p.run_id, FRONTIER_TAG, "true" if p.run_id in on_front else "false")
    if parent_run_id:
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / "frontier.csv").write_text(frontier_csv(points, on_front))
            (folder / "frontier.html").write_text(frontier_html(points, front))
            plot_frontier(points, front, folder / "frontier.png")
            for name in ("frontier.csv", "frontier.html", "frontier.png"):
                client.log_artifact(parent_run_id, str(folder / name))
        if front:
            step, reference = len(points), reference_gflops(points, max_gflops)
            client.log_metric(parent_run_id, "frontier_size", len(front), step=step)
            client.log_metric(parent_run_id, "best_map", max(p.map for p in front), step=step)
            client.log_metric(parent_run_id, "hypervolume",
                              hypervolume([(p.map, p.gflops) for p in front], (0.0, reference)), step=step)
            client.log_metric(parent_run_id, "hypervolume_reference_gflops", reference, step=step)
    return front


def frontier_csv(points: list[TrialPoint], on_front: set[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run_id", "run_name", "map", "map50", "gflops", "params_m", "frontier"])
    for p in sorted(points, key=lambda p: p.gflops):
        writer.writerow([p.run_id, p.run_name, f"{p.map:.4f}", f"{p.map50:.4f}", f"{p.gflops:.4f}",
                         f"{p.params_m:.3f}", str(p.run_id in on_front).lower()])
    return out.getvalue()


def frontier_html(points: list[TrialPoint], front: list[TrialPoint]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(p.run_name)}</td><td><code>{p.run_id}</code></td><td>{p.map:.3f}</td>"
        f"<td>{p.gflops:.3f}</td><td>{p.params_m:.2f}</td></tr>" for p in front)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>effsearch frontier</title></head><body>"
        f"<h1>Accuracy vs FLOPs frontier</h1><p>{len(front)} of {len(points)} finished trials are on the frontier."
        "</p><img src='frontier.png' alt='frontier plot'><table border='1' cellpadding='4'>"
        "<tr><th>run</th><th>run id</th><th>AP</th><th>GFLOPs</th><th>params (M)</th></tr>"
        f"{rows}</table></body></html>")


def plot_frontier(points: list[TrialPoint], front: list[TrialPoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter([p.gflops for p in points], [p.map for p in points], c="#999999", label="trials")
    ordered = sorted(front, key=lambda p: p.gflops)
    ax.plot([p.gflops for p in ordered], [p.map for p in ordered], "o-", c="#d62728", label="frontier")
    ax.set_xlabel("GFLOPs (multiply-adds per image)")
    ax.set_ylabel("COCO AP @[.5:.95]")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(front: list[TrialPoint]) -> str:
    lines = [f"{'run':<24} {'run_id':<32} {'AP':>6} {'GFLOPs':>8} {'params M':>8}"]
    for p in sorted(front, key=lambda p: p.gflops):
        lines.append(f"{p.run_name:<24} {p.run_id:<32} {p.map:>6.3f} {p.gflops:>8.3f} {p.params_m:>8.2f}")
    return "\n".join(lines)
