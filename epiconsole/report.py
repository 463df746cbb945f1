"""The markdown report of a campaign: the paper's tables filled in, plus what the analysis found.

:func:`render` turns an :class:`~epiconsole.analysis.Analysis` into markdown: overview, the results
tables (all layers, early only, late only, best-of), the EPI-optimal vs accuracy-optimal depth per
target, the Pareto set, the energy decomposition, a plain-text EPI curve (plotext) and the invalid or
failed repetitions with their reasons. A simulated campaign's report starts with ``# SIMULATED DATA``.
"""

from __future__ import annotations

import time
from typing import Any

from epiconsole.analysis import Analysis, Table, decomposition_table, fmt, pareto_table, task_table

SIMULATED_LINE = "# SIMULATED DATA"
#: Markers per target in the text plot (plotext markers), so the curves stay apart without colour.
_MARKERS = {"all": "dot", "early": "x", "late": "+"}


def markdown_table(table: Table) -> str:
    """A :class:`Table` as a GitHub-flavoured markdown table (pipes in cells escaped)."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"### {table.title}", ""]
    if not table.rows:
        lines.append("_No data._")
    else:
        lines.append("| " + " | ".join(esc(h) for h in table.headers) + " |")
        lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(table.headers))) + "|")
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines)


def epi_curve_text(a: Analysis, width: int = 78, height: int = 22) -> str:
    """EPI (median) vs experts dropped, one series per layer target, as plain text (no colour codes)."""
    import plotext as plt

    series = [c for c in a.curves if len(c.points) >= 1]
    if not series:
        return ""
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    xs_all: set[int] = set()
    for curve in series:
        xs = [p.experts for p in curve.points]
        ys = [p.epi.median for p in curve.points]
        xs_all |= set(xs)
        plt.plot(xs, ys, label=curve.target, marker=_MARKERS.get(curve.target, "dot"))
    ticks = sorted(xs_all)
    plt.xticks(ticks, [str(x) for x in ticks])
    plt.title("EPI vs experts dropped (median of valid repetitions; lower is better)")
    plt.xlabel("experts dropped")
    text = plt.uncolorize(plt.build())
    plt.clear_figure()
    return "\n".join(line.rstrip() for line in text.splitlines())


def _depths_section(a: Analysis) -> list[str]:
    lines = ["## EPI-optimal vs accuracy-optimal depth", ""]
    if not a.depths:
        return lines + ["_No pruning curves in this campaign._", ""]
    lines += [f"Accuracy-optimal: the deepest prune whose accuracy stays within {a.tolerance_pts:g} point(s) "
              "of the baseline. EPI-optimal: the depth with the lowest median EPI.", ""]
    lines += ["| Target | EPI-optimal depth | EPI there | Accuracy-optimal depth | Verdict |", "|---|---:|---:|---:|---|"]
    for d in a.depths:
        if d.epi_optimal is None:
            verdict = "no data"
        elif d.accuracy_optimal is None:
            # The baseline is always within tolerance of itself, so this means it has no accuracy.
            verdict = "no baseline accuracy to compare with"
        elif d.tension:
            verdict = f"EPI favours pruning {d.epi_optimal - d.accuracy_optimal} expert(s) deeper than accuracy allows"
        elif d.epi_optimal == d.accuracy_optimal:
            verdict = "agree"
        else:
            verdict = "EPI is lowest within the accuracy tolerance"
        lines.append(f"| {d.target} | {fmt(d.epi_optimal, 'd')} | {fmt(d.epi_optimal_value)} | "
                     f"{fmt(d.accuracy_optimal, 'd')} | {verdict} |")
    return lines + [""]


def _problems_section(a: Analysis) -> list[str]:
    bad = [r for r in a.repetitions if r.judged_invalid or r.status == "failed"]
    lines = ["## Invalid and failed repetitions", ""]
    if not bad:
        return lines + ["None: every finished repetition passed the validity checks.", ""]
    lines += ["Excluded from the medians above (counted in the Valid column).", ""]
    for r in bad:
        why = "; ".join(r.reasons) or "no reason recorded"
        lines.append(f"- `{r.config_id}` rep {r.rep}: {'failed' if r.status == 'failed' else 'invalid'}: {why}")
    return lines + [""]


def render(a: Analysis, *, campaign: Any = None, generated_at: float | None = None) -> str:
    """The whole report as markdown text."""
    lines: list[str] = []
    if a.simulated:
        lines += [SIMULATED_LINE, "",
                  "> **Simulated data.** Every figure below comes from epiconsole's simulated lab, not from hardware.",
                  ""]
    plan = getattr(campaign, "plan_name", "") or "campaign"
    cid = a.campaign_id if a.campaign_id is not None else getattr(campaign, "id", None)
    lines += [f"## EPI results: {plan}" + (f" (campaign {cid})" if cid is not None else ""), ""]
    counts = a.counts
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(generated_at if generated_at is not None else time.time()))
    lines += [
        "EPI = (E_total / N_tokens) / A: joules per token divided by composite accuracy (lower is better).",
        "",
        f"- Configurations: {len(a.configs)}; repetitions: {counts['repetitions']} "
        f"({counts['valid']} valid, {counts['invalid']} invalid, {counts['failed']} failed, {counts['pending']} not run)",
        f"- Baseline: `{a.baseline_id}`" if a.baseline_id else "- Baseline: none in this campaign",
    ]
    if campaign is not None:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(campaign.started_at))
        lines.append(f"- Started {started}; status: {campaign.exit_status or 'unfinished'}")
        denom = (campaign.provenance or {}).get("token_denominator")
        if denom:
            lines.append(f"- Tokens counted: {denom}")
    lines += [f"- Generated {when}", ""]
    lines += ["## Results", ""]
    for table in a.tables:
        lines += [markdown_table(table), ""]
    lines += [markdown_table(task_table(a)), ""]
    lines += _depths_section(a)
    lines += ["## Pareto set", "", markdown_table(pareto_table(a)), ""]
    lines += ["## Energy decomposition", "", markdown_table(decomposition_table(a)), ""]
    curve = epi_curve_text(a)
    if curve:
        lines += ["## EPI curve", "", "```text", curve, "```", ""]
    lines += _problems_section(a)
    return "\n".join(lines).rstrip() + "\n"
