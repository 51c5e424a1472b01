"""The audit's reports: a summary line, a terminal table, JUnit XML, and the
Markdown table SECURITY.md carries.
"""

from __future__ import annotations

from xml.etree import ElementTree

from corral.audit._probe import (
    PROBES,
    ProbeReport,
)


def summary(reports: list[ProbeReport]) -> str:
    counts = {
        kind: sum(r.result == kind for r in reports) for kind in ("pass", "fail", "skip", "error")
    }
    line = f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
    if counts["error"]:
        line += f", {counts['error']} errors"
    reasons = sorted({r.detail for r in reports if r.result == "skip"})
    if reasons:
        line += f" ({'; '.join(reasons)})"
    return line


def table(reports: list[ProbeReport], *, colour: bool) -> str:
    colours = {"pass": "32", "fail": "31", "skip": "33", "error": "35"}
    width = max([len(r.id) for r in reports] + [5]) + 2
    rows = [f"{'PROBE':{width}}RESULT  DETAIL"]
    for r in reports:
        result = f"{r.result:7}"
        if colour:
            result = f"\033[{colours[r.result]}m{result}\033[0m"
        rows.append(f"{r.id:{width}}{result} {r.detail}")
    rows.append(summary(reports))
    return "\n".join(rows)


def junit(reports: list[ProbeReport]) -> str:
    suite = ElementTree.Element(
        "testsuite",
        name="corral-audit",
        tests=str(len(reports)),
        failures=str(sum(r.result == "fail" for r in reports)),
        errors=str(sum(r.result == "error" for r in reports)),
        skipped=str(sum(r.result == "skip" for r in reports)),
    )
    for r in reports:
        case = ElementTree.SubElement(
            suite, "testcase", classname=r.id.split(".")[0], name=r.id, time=f"{r.duration_s:.3f}"
        )
        if r.result in ("fail", "error"):
            tag = "failure" if r.result == "fail" else "error"
            ElementTree.SubElement(case, tag, message=r.detail).text = f"threat: {r.threat}"
        elif r.result == "skip":
            ElementTree.SubElement(case, "skipped", message=r.detail)
    return ElementTree.tostring(suite, encoding="unicode")


def markdown() -> str:
    """The probe table of SECURITY.md: every probe, its threat and mechanism."""
    rows = ["| probe | what it checks | threat | mechanism |", "|---|---|---|---|"]
    for p in PROBES:
        rows.append(f"| `{p.id}` | {p.title} | {p.threat} | {p.mechanism} |")
    return "\n".join(rows) + "\n"
