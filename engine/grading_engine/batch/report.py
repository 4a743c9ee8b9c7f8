"""Grade reports from the gradebook: a CSV for the class, an HTML page and PNG plots per assignment.

``grades.csv`` has one row per student and assignment: total and autograded
points, what still waits for a person in the formgrader, and the batch
status (``ok``, ``failed`` with the reason, or ``not graded``).

``<assignment>.html`` shows, at a glance, the distribution of autograded
scores and the pass rate of every autograded question (the share of
submissions that earned the question's full points), worst first, so the
question the class failed stands out; the same plots are saved as
``<assignment>_scores.png`` and ``<assignment>_questions.png``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from grading_engine.batch.runner import Course, discover, load_course, read_journal


@dataclass
class Question:
    notebook: str
    name: str
    max_score: float
    scores: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.notebook}: {self.name}"

    @property
    def pass_rate(self) -> float:
        if not self.scores or self.max_score <= 0:
            return float("nan")
        return sum(s >= self.max_score - 1e-9 for s in self.scores) / len(self.scores)

    @property
    def mean_fraction(self) -> float:
        if not self.scores or self.max_score <= 0:
            return float("nan")
        return sum(self.scores) / (len(self.scores) * self.max_score)


@dataclass
class AssignmentData:
    name: str
    rows: list[dict]
    questions: list[Question]
    auto_max: float


def collect(course: Course, assignment: str) -> AssignmentData:
    from nbgrader.api import Gradebook, MissingEntry

    rows: list[dict] = []
    questions: dict[tuple[str, str], Question] = {}
    with Gradebook(course.db_url, course.course_id) as gb:
        a = gb.find_assignment(assignment)
        auto_max = 0.0
        order: list[tuple[str, str]] = []
        for nb in a.notebooks:
            for cell in nb.grade_cells:
                if cell.cell_type == "code" and not _is_solution(nb, cell.name):
                    order.append((nb.name, cell.name))
                    auto_max += cell.max_score
                    questions[(nb.name, cell.name)] = Question(nb.name, cell.name, cell.max_score)
        auto_ids = set(questions)
        students = sorted({s.student.id for s in a.submissions} | set(discover(course, assignment)))
        for sid in students:
            j = read_journal(course, assignment, sid) or {}
            row = {"student_id": sid, "assignment": assignment, "score": "", "max_score": a.max_score,
                   "auto_score": "", "auto_max": auto_max, "needs_manual_grade": "",
                   "status": j.get("status", "not graded"), "error": _one_line(j.get("error"))}
            try:
                sub = gb.find_submission(assignment, sid)
            except MissingEntry:
                rows.append(row)
                continue
            auto = 0.0
            for snb in sub.notebooks:
                for g in snb.grades:
                    key = (snb.name, g.name)
                    if key in auto_ids:
                        got = g.auto_score or 0.0
                        auto += got
                        if row["status"] == "ok":
                            questions[key].scores.append(got)
            row.update(score=round(sub.score, 4), auto_score=round(auto, 4),
                       needs_manual_grade=bool(sub.needs_manual_grade))
            rows.append(row)
    return AssignmentData(assignment, rows, [questions[k] for k in order], auto_max)


def _is_solution(nb, name: str) -> bool:
    return any(c.name == name for c in nb.solution_cells)


def _one_line(msg) -> str:
    if not msg:
        return ""
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


CSV_FIELDS = ["assignment", "student_id", "score", "max_score", "auto_score", "auto_max",
              "needs_manual_grade", "status", "error"]


def write_csv(data: list[AssignmentData], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for d in data:
            for r in d.rows:
                w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def _figures(d: AssignmentData):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    graded = [r for r in d.rows if r["status"] == "ok" and r["auto_score"] != ""]
    pct = [100.0 * r["auto_score"] / d.auto_max for r in graded] if d.auto_max else []
    fig1, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.hist(pct, bins=[i * 10 for i in range(11)], color="#4C72B0", edgecolor="white")
    ax.set_xlim(0, 100)
    ax.set_xlabel("autograded score (% of the autograded points)")
    ax.set_ylabel("students")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    failed = sum(r["status"] == "failed" for r in d.rows)
    ax.set_title(f"{d.name}: {len(graded)} graded" + (f", {failed} could not be graded" if failed else ""))
    fig1.tight_layout()

    fig2 = _questions_figure(d, plt)
    return fig1, fig2


def worst_first(questions: list[Question]) -> list[Question]:
    """Lowest pass rate first (then lowest mean share of points); questions nobody was graded on last."""
    graded = [q for q in questions if q.scores]
    return sorted(graded, key=lambda q: (q.pass_rate, q.mean_fraction)) + [q for q in questions if not q.scores]


def short_names(notebooks: list[str]) -> dict[str, str]:
    """For each notebook, the shortest leading run of its ``_``-separated words that no other notebook shares
    (``ex01_embedding_lookup`` -> ``ex01``)."""
    out = {}
    for nb in notebooks:
        words = nb.split("_")
        for n in range(1, len(words) + 1):
            tag = "_".join(words[:n])
            if not any(o != nb and (o == tag or o.startswith(tag + "_")) for o in notebooks):
                break
        out[nb] = tag
    return out


def _questions_figure(d: AssignmentData, plt):
    """Pass rate per autograded question, worst at the top; the notebook is named once (in the title) when
    there is one, else by a short tag before each question."""
    import textwrap

    qs = worst_first(d.questions)
    notebooks = list(dict.fromkeys(q.notebook for q in d.questions))
    tags = short_names(notebooks)
    labels = [q.name if len(notebooks) == 1 else f"{tags[q.notebook]}  {q.name}" for q in qs]
    rates = [100.0 * q.pass_rate if q.scores else 0.0 for q in qs]
    colors = ["#C44E52" if r < 50 else ("#DD8452" if r < 80 else "#55A868") for r in rates]
    fig, ax = plt.subplots(figsize=(8, max(2.8, 0.26 * len(qs) + 1.6)), dpi=110, layout="constrained")
    y = list(range(len(qs)))[::-1]  # the first (worst) at the top
    ax.barh(y, rates, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(-0.6, len(qs) - 0.4)
    ax.set_xlim(0, 100)
    ax.set_xlabel("students with full points (%)")
    what = notebooks[0] if len(notebooks) == 1 else f"{d.name} ({len(notebooks)} notebooks)"
    ax.set_title("\n".join(textwrap.wrap(f"{what}: pass rate per autograded question, worst first", 70)),
                 loc="left", fontsize=10)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="#C44E52", label="under 50%"), Patch(color="#DD8452", label="50-79%"),
                        Patch(color="#55A868", label="80% or more")],
               fontsize=7, loc="outside lower center", ncols=3, frameon=False)
    for yi, r, q in zip(y, rates, qs):
        text = f"{r:.0f}%" if q.scores else "not graded"
        inside = r > 88
        ax.text(r - 1 if inside else r + 1, yi, text, va="center", ha="right" if inside else "left", fontsize=7,
                color="white" if inside else "#222")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_assignment_report(d: AssignmentData, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig1, fig2 = _figures(d)
    png1, png2 = _png(fig1), _png(fig2)
    plt.close(fig1)
    plt.close(fig2)
    (out / f"{d.name}_scores.png").write_bytes(png1)
    (out / f"{d.name}_questions.png").write_bytes(png2)
    graded = [r for r in d.rows if r["status"] == "ok" and r["auto_score"] != ""]
    scores = sorted(r["auto_score"] for r in graded)
    mean = sum(scores) / len(scores) if scores else float("nan")
    median = scores[len(scores) // 2] if scores else float("nan")
    worst = sorted((q for q in d.questions if q.scores), key=lambda q: q.pass_rate)[:3]
    failed = [r for r in d.rows if r["status"] == "failed"]
    pending = sum(1 for r in graded if r["needs_manual_grade"])
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(d.name)}: grading report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;font-size:.9em}"
        ".low{background:#f8d7da}.mid{background:#fff3cd}</style></head><body>",
        f"<h1>{e(d.name)}</h1>",
        f"<p><b>{len(graded)}</b> submissions graded, <b>{len(failed)}</b> could not be graded, "
        f"<b>{pending}</b> wait for manual grading in the formgrader. Autograded points: mean "
        f"<b>{mean:.2f}</b>, median <b>{median:.2f}</b> of <b>{d.auto_max:g}</b>.</p>",
    ]
    if worst:
        parts.append("<p>Hardest questions: " + ", ".join(
            f"<b>{e(q.label)}</b> ({100 * q.pass_rate:.0f}% full points)" for q in worst) + ".</p>")
    parts += [
        "<h2>Score distribution</h2>",
        f"<img alt='score distribution' src='data:image/png;base64,{base64.b64encode(png1).decode()}'>",
        "<h2>Pass rate per question</h2>",
        f"<img alt='pass rate per question' src='data:image/png;base64,{base64.b64encode(png2).decode()}'>",
        "<table><tr><th>notebook</th><th>question (grade_id)</th><th>points</th>"
        "<th>full points</th><th>mean share of points</th></tr>",
    ]
    for q in d.questions:
        rate = q.pass_rate
        cls = "low" if rate < 0.5 else ("mid" if rate < 0.8 else "")
        parts.append(f"<tr class='{cls}'><td>{e(q.notebook)}</td><td>{e(q.name)}</td><td>{q.max_score:g}</td>"
                     f"<td>{100 * rate:.0f}%</td><td>{100 * q.mean_fraction:.0f}%</td></tr>")
    parts.append("</table>")
    if failed:
        parts.append("<h2>Submissions that could not be graded</h2><ul>")
        for r in failed:
            parts.append(f"<li><b>{e(r['student_id'])}</b>: {e(r['error'])}</li>")
        parts.append("</ul><p>Logs: <code>.batch/logs/</code> in the course directory.</p>")
    parts.append("</body></html>")
    path = out / f"{d.name}.html"
    path.write_text("\n".join(parts))
    return path


def write_reports(assignments: list[str], out: Path, course_dir: Path | str | None = None) -> dict[str, Path]:
    """grades.csv for all ``assignments`` and an HTML report (with PNGs) for each; returns the paths."""
    course = load_course(course_dir)
    data = [collect(course, a) for a in assignments]
    paths = {"csv": out / "grades.csv"}
    write_csv(data, paths["csv"])
    for d in data:
        paths[d.name] = write_assignment_report(d, out)
    (out / "summary.json").write_text(json.dumps(
        {d.name: {q.label: q.pass_rate for q in d.questions} for d in data}, indent=1))
    return paths
