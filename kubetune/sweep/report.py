"""The HTML report of a sweep: Optuna's own plotly figures of the study, in one file that opens
offline (plotly.js inline, once)."""

from __future__ import annotations

import html
from collections.abc import Sequence

import optuna
from optuna import visualization
from optuna.trial import TrialState as OptunaState
from plotly.graph_objects import Figure

from kubetune.api.sweep import FineTuneSweepSpec
from kubetune.sweep.study import TrialRecord, rebuild

# Parameter importances fit a model of the objective over the parameters: with fewer completed
# trials than this it describes noise.
MIN_TRIALS_FOR_IMPORTANCES = 4


def figures(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> dict[str, Figure]:
    """Title -> figure: the optimization history, the parameter importances (two or more
    parameters and enough completed trials) and every trial's intermediate values."""
    study: optuna.Study = rebuild(spec, records)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == OptunaState.COMPLETE]
    found: dict[str, Figure] = {}
    if complete:
        found["Optimization history"] = visualization.plot_optimization_history(
            study, target_name=spec.objective.metric
        )
    if len(spec.parameters) >= 2 and len(complete) >= MIN_TRIALS_FOR_IMPORTANCES:
        found["Parameter importances"] = visualization.plot_param_importances(study)
    if any(r.intermediate for r in records):
        found["Intermediate values"] = visualization.plot_intermediate_values(study)
    return found


def render(title: str, spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> str:
    """A self-contained HTML page with :func:`figures` (plotly.js inlined in the first)."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    figs = figures(spec, records)
    if not figs:
        parts.append("<p>No trial reported an evaluation.</p>")
    for index, (name, fig) in enumerate(figs.items()):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=index == 0))
    parts.append("</body></html>")
    return "\n".join(parts)
