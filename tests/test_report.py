"""The markdown report: tables, depths, Pareto set, decomposition, text curve, simulated marks."""

from __future__ import annotations

import re
from pathlib import Path

from epiconsole.analysis import analyze
from epiconsole.ledger import Ledger
from epiconsole.report import epi_curve_text, markdown_table, render
from tests.analysis_fixtures import build_campaign, paper_like_results, result


def _tables(md: str) -> list[list[str]]:
    """Markdown tables as lists of their lines."""
    out: list[list[str]] = []
    current: list[str] = []
    for line in md.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))


def test_report_has_every_section_and_well_formed_tables() -> None:
    a = analyze(paper_like_results(), simulated=False, campaign_id=3)
    md = render(a, generated_at=0.0)
    assert not md.startswith("# SIMULATED DATA") and "Simulated data" not in md
    for heading in ("### All layers", "### Early layers only", "### Late layers only", "### Best of",
                    "## EPI-optimal vs accuracy-optimal depth", "## Pareto set", "## Energy decomposition",
                    "## EPI curve", "## Invalid and failed repetitions"):
        assert heading in md, heading
    tables = _tables(md)
    assert len(tables) >= 7
    for t in tables:
        widths = {_cells(line) for line in t}
        assert len(widths) == 1, t[:2]  # header, separator and rows agree
        assert set(t[1].replace("|", "").replace("-", "").replace(":", "").strip()) == set()
    depth = next(line for line in md.splitlines() if line.startswith("| all |"))
    d = a.depths[0]
    assert f"| {d.epi_optimal} |" in depth and "| 3 |" in depth and "deeper than accuracy allows" in depth


def test_pareto_and_decomposition_sections_name_the_right_configurations() -> None:
    a = analyze(paper_like_results())
    md = render(a)
    section = md.split("## Pareto set", 1)[1].split("## Energy decomposition", 1)[0]
    named = re.findall(r"^\| (\w+) \|", section, flags=re.M)
    assert named[1:] == list(a.pareto)  # first match is the header
    decomposition = md.split("## Energy decomposition", 1)[1].split("## EPI curve", 1)[0]
    assert "| baseline |" not in decomposition and "| drop8_all |" in decomposition


def test_text_curve_is_plain_text_with_every_target() -> None:
    a = analyze(paper_like_results())
    text = epi_curve_text(a)
    assert "\x1b" not in text  # no colour codes in a markdown file
    assert "all" in text and "early" in text and "late" in text and "experts dropped" in text
    assert len(text.splitlines()) >= 15
    md = render(a)
    assert "```text\n" + text + "\n```" in md
    # plotext's figure is global: rendering twice gives the same text (no state leaks between reports)
    assert epi_curve_text(a) == text


def test_no_curve_without_pruned_configurations() -> None:
    a = analyze([result("baseline", 1), result("baseline", 2)])
    assert epi_curve_text(a) == ""
    assert "## EPI curve" not in render(a)


def test_invalid_repetitions_are_listed_with_reasons_and_pipes_are_escaped() -> None:
    res = paper_like_results()
    res.append(result("drop1_all", 4, experts=1, target="all", ord_=1, valid=False, reasons=("gap | 3 s on pi1",)))
    md = render(analyze(res))
    assert "- `drop1_all` rep 4: invalid: gap | 3 s on pi1" in md
    line = next(line for line in md.splitlines() if line.startswith("| 1 | drop1_all |"))
    assert "| 3/4 |" in line


def test_markdown_table_of_an_empty_table_says_so() -> None:
    from epiconsole.analysis import Table

    assert "_No data._" in markdown_table(Table("Empty", ("a", "b"), ()))
    text = markdown_table(Table("Pipes", ("a|b", "c"), (("x|y", "z"),)))
    assert "a\\|b" in text and "x\\|y" in text


async def test_simulated_campaign_report_from_a_ledger(tmp_path: Path) -> None:
    built = await build_campaign(tmp_path / "l.sqlite", only=["baseline", "drop1_all", "drop1_early", "drop1_late"],
                                 reps=2)
    async with await Ledger.open(built.path, readonly=True) as ledger:
        campaign = await ledger.campaign(built.campaign_id)
        res = await ledger.results(built.campaign_id)
    md = render(analyze(res, simulated=True, campaign_id=built.campaign_id), campaign=campaign)
    assert md.splitlines()[0] == "# SIMULATED DATA"
    assert "Simulated data" in md and f"(campaign {built.campaign_id})" in md
    assert "status: finished" in md and "8 valid" in md


def test_accuracy_by_task_table() -> None:
    res = [result("baseline", r, acc=0.8) for r in (1, 2, 3)]
    res.append(result("drop1_all", 1, experts=1, target="all", ord_=1, acc=0.7))
    md = render(analyze(res))
    section = md.split("### Accuracy by task (%)", 1)[1]
    assert "| Configuration | mmlu | arc_challenge | Composite |" in section
    assert "| baseline | 80.0 | 80.0 | 80.0 |" in section and "| drop1_all | 70.0 | 70.0 | 70.0 |" in section


def test_depth_verdict_without_a_baseline_accuracy_says_so() -> None:
    res = [r for r in paper_like_results() if r.trial.config_id != "baseline"]
    res += [result("baseline", 1, valid=False, reasons=("throttled",))]
    md = render(analyze(res))
    section = md.split("## EPI-optimal vs accuracy-optimal depth")[1].split("## ")[0]
    assert section.count("no baseline accuracy to compare with") == 3
    assert "within tolerance |" not in section
