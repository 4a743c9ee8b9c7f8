"""Before nbgrader sanitises a submission: check its structure, scan its code, repair what stops a batch.

:class:`GuardSubmission` is the first of ``Autograde.sanitize_preprocessors``.
It sees each notebook exactly as the student handed it in and

* repairs nbgrader metadata that would make nbgrader stop (a cell whose
  ``nbgrader`` metadata is empty, old, new or invalid makes stock nbgrader
  raise ``SchemaTooOldError`` and abort the *whole batch* with "use an old
  version of the metadata"): a cell whose grade_id the gradebook knows gets
  the gradebook's metadata back, any other cell loses its nbgrader metadata
  and is graded as ordinary code;
* removes the nbgrader metadata of duplicated graded cells itself (keeping
  the last, as nbgrader does; nbgrader's own de-duplication leaves an empty
  metadata dict behind, which then stops the batch the same way);
* flags changed locked cells, cells that changed type, missing test cells,
  test cells stripped of their metadata, graded cells out of order, and
  anything :mod:`grading_engine.evidence.scan` finds in the code the student wrote.

Points are never given here: nbgrader restores locked cells and cell types,
and a test cell that is missing or stripped earns nothing.

:class:`SubmissionCheck` is nbgrader's ``pre_convert_hook``: it flags missing,
renamed (unknown), unreadable notebooks and extra files (a ``torch.py`` or
``ipykernel_launcher.py`` handed in next to the notebooks) once per
submission, and replaces symbolic links in a submission by a note: nbgrader
copies a submission's files following links, as the instructor, so a link to
``../../../source/...`` would otherwise hand the instructor's file to the
student's code.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

from nbformat import NotebookNode
from nbgrader.coursedir import CourseDirectory
from nbgrader.preprocessors import NbGraderPreprocessor

from grading_engine import record as report
from grading_engine.evidence.reference import gradebook_notebook, nbg, reference_notebook
from grading_engine.evidence.scan import imported_names, scan_code

SHADOWING = {"torch.py", "numpy.py", "sitecustomize.py", "usercustomize.py", "ipykernel_launcher.py", "course",
             "torch", "numpy", "IPython", "ipykernel", "json.py", "os.py", "sys.py", "math.py", "random.py",
             "matplotlib.py", "transformers.py", "nbformat.py", "site.py", "tempfile.py", "shutil.py"}


def _flag(kind: str, detail: str, where: str = "", source: str = "structure") -> dict:
    return {"kind": kind, "source": source, "detail": detail, "where": where}


def released(source: str) -> str:
    """A cell's source as students receive it: hidden-test regions removed (as ClearHiddenTests does)."""
    out, inside = [], False
    for line in source.split("\n"):
        if "BEGIN HIDDEN TESTS" in line:
            inside = True
        elif "END HIDDEN TESTS" in line:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)


def _norm(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _first_line(src: str) -> str:
    for line in src.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    return ""


class GuardSubmission(NbGraderPreprocessor):
    def preprocess(self, nb: NotebookNode, resources: dict):
        info = resources["nbgrader"]
        assignment, notebook, student = info["assignment"], info["notebook"], info["student"]
        coursedir = CourseDirectory(config=self.config)
        flags: list[dict] = []
        try:
            gbnb = gradebook_notebook(info["db_url"], assignment, notebook)
        except Exception:
            self.log.warning("integrity: notebook %s is not in the gradebook; no structure check", notebook)
            return nb, resources
        src_path = Path(coursedir.format_path(coursedir.source_directory, ".", assignment)) / f"{notebook}.ipynb"
        ref = reference_notebook(src_path, gbnb) if src_path.exists() else None

        flags += self._repair_metadata(nb, gbnb)
        flags += self._structure(nb, gbnb, ref)
        flags += self._scan(nb, gbnb, ref)
        try:
            report.set_stage_flags(coursedir.root, assignment, student, notebook, "guard", flags)
        except Exception:
            self.log.error("integrity: could not write the record: %s", traceback.format_exc())
        for f in flags:
            self.log.warning("integrity flag %s/%s/%s: %s: %s", student, assignment, notebook, f["kind"], f["detail"])
        return nb, resources

    def _repair_metadata(self, nb, gbnb) -> list[dict]:
        from nbgrader.nbgraderformat import MetadataValidator

        validator = MetadataValidator()
        flags = []
        for i, cell in enumerate(nb.cells):
            md = cell.get("metadata", {})
            if "nbgrader" not in md:
                continue
            meta = md["nbgrader"]
            gid = meta.get("grade_id") if isinstance(meta, dict) else None
            try:
                if not isinstance(meta, dict):
                    raise ValueError("not a dict")
                validator.validate_cell(cell)
                broken = False
            except Exception:
                broken = True
            known = gid in gbnb.source
            if known and broken:
                md["nbgrader"] = gbnb.canonical_metadata(gid)
                flags.append(_flag("damaged_metadata", f"cell {i} ({gid}): nbgrader metadata was invalid; restored "
                                                       "from the gradebook", f"cell {i}"))
            elif broken:
                del md["nbgrader"]
                flags.append(_flag("damaged_metadata", f"cell {i}: invalid nbgrader metadata removed; graded as "
                                                       "ordinary code", f"cell {i}"))
            elif gid is not None and not known:
                del md["nbgrader"]
                flags.append(_flag("unknown_grade_id", f"cell {i} claims grade_id {gid!r}, which this notebook "
                                                       "does not have; graded as ordinary code", f"cell {i}"))
        # duplicates: keep the last occurrence, as nbgrader does, but leave no empty metadata behind
        last: dict[str, int] = {}
        for i, cell in enumerate(nb.cells):
            gid = nbg(cell).get("grade_id")
            if gid:
                last[gid] = i
        for i, cell in enumerate(nb.cells):
            gid = nbg(cell).get("grade_id")
            if gid and last[gid] != i:
                del cell.metadata["nbgrader"]
                flags.append(_flag("duplicate_cell", f"cell {i} duplicates graded cell {gid!r}; only the last copy "
                                                     "is graded", f"cell {i}"))
        return flags

    def _structure(self, nb, gbnb, ref) -> list[dict]:
        flags = []
        present = {}
        for i, cell in enumerate(nb.cells):
            gid = nbg(cell).get("grade_id")
            if gid:
                present[gid] = i
                src = gbnb.source.get(gid)
                if src is None:
                    continue
                if cell.cell_type != src["cell_type"]:
                    flags.append(_flag("cell_type_changed", f"{gid} was turned from {src['cell_type']} into "
                                                            f"{cell.cell_type} (nbgrader turns it back)", f"cell {i}"))
                if src["locked"] and _norm(cell.source) not in (_norm(src["source"]), _norm(released(src["source"]))):
                    flags.append(_flag("changed_locked_cell", f"locked cell {gid} was changed (nbgrader restores "
                                                              "it before grading)", f"cell {i}"))
        graded_code = [g for g, s in gbnb.source.items() if g in gbnb.grade and s["cell_type"] == "code"
                       and g not in gbnb.solution]
        loose = [c for c in nb.cells if not nbg(c).get("grade_id")]
        for gid in graded_code:
            if gid in present:
                continue
            first = _first_line(gbnb.source[gid]["source"])
            if first and any(_first_line(c.source) == first for c in loose):
                flags.append(_flag("test_cell_without_metadata", f"test cell {gid} lost its nbgrader metadata: "
                                                                 "it runs as ordinary code and earns nothing"))
            else:
                flags.append(_flag("missing_cell", f"test cell {gid} is missing: it earns nothing"))
        for gid in gbnb.solution:
            if gid not in present:
                flags.append(_flag("missing_cell", f"answer cell {gid} is missing"))
        if ref is not None:
            order = [nbg(c).get("grade_id") for c in ref.cells if nbg(c).get("grade_id")]
            seen = [g for g in sorted(present, key=present.get) if g in order]
            expected = [g for g in order if g in present]
            if seen != expected:
                moved = [g for g, e in zip(seen, expected) if g != e]
                flags.append(_flag("reordered_cells", f"graded cells are out of order (first: {moved[:3]})"))
        return flags

    def _scan(self, nb, gbnb, ref) -> list[dict]:
        ref_code = set()
        ref_sources = []
        if ref is not None:
            for c in ref.cells:
                if c.cell_type == "code":
                    ref_code |= {_norm(c.source), _norm(released(c.source))}
                    ref_sources.append(c.source)
        locked = {_norm(f(s["source"])) for s in gbnb.source.values() if s["locked"] for f in (str, released)}
        modules = imported_names(ref_sources + [c.source for c in nb.cells if c.cell_type == "code"])
        flags = []
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            text = _norm(cell.source)
            if not text or text in ref_code or text in locked:
                continue
            gid = nbg(cell).get("grade_id")
            where = f"cell {i}" + (f" ({gid})" if gid else "")
            for f in scan_code(cell.source, where, modules):
                f["source"] = "static"
                flags.append(f)
        return flags


class SubmissionCheck:
    """``Autograde.pre_convert_hook``: flags about the submissions' files (never raises).

    nbgrader calls the hook once per submission but passes the command line's
    patterns (``student="*"`` in a batch), not the submission's ids; so the
    first call checks every submitted folder the patterns match, which also
    covers the submissions nbgrader itself skips (no notebook at all).
    """

    def __init__(self, config, chained=None):
        self.config = config
        self.chained = chained
        self.done: set[str] = set()

    def __call__(self, assignment=None, student=None, notebooks=None, **kw):
        try:
            cd = CourseDirectory(config=self.config)
            pattern = cd.format_path(cd.submitted_directory, student or "*", assignment or "*")
            import glob

            for folder in sorted(glob.glob(pattern)):
                if folder not in self.done and Path(folder).is_dir():
                    self.done.add(folder)
                    p = Path(folder)
                    self.check(p.name, p.parent.name)
        except Exception:
            import logging

            logging.getLogger("grading_engine").error("integrity: submission check failed: %s",
                                                        traceback.format_exc())
        if self.chained is not None:
            self.chained(assignment=assignment, student=student, notebooks=notebooks, **kw)

    def check(self, assignment: str, student: str) -> None:
        from nbgrader.api import Gradebook

        cd = CourseDirectory(config=self.config)
        sub = Path(cd.format_path(cd.submitted_directory, student, assignment))
        if not sub.exists():
            return
        with Gradebook(cd.db_url) as gb:
            try:
                expected = [n.name for n in gb.find_assignment(assignment).notebooks]
            except Exception:
                return
        flags = []
        present = {p.stem for p in sub.glob("*.ipynb")}
        unknown = sorted(present - set(expected))
        for name in expected:
            if name not in present:
                hint = f" (found {', '.join(u + '.ipynb' for u in unknown)}: renamed?)" if unknown else ""
                flags.append(_flag("missing_notebook", f"{name}.ipynb was not handed in: it earns nothing{hint}"))
        for u in unknown:
            flags.append(_flag("unknown_notebook", f"{u}.ipynb is not a notebook of this assignment: not graded"))
        for name in expected:
            p = sub / f"{name}.ipynb"
            if p.exists():
                try:
                    data = json.loads(p.read_text())
                    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
                        raise ValueError("no list of cells")
                except Exception as exc:
                    flags.append(_flag("invalid_notebook", f"{name}.ipynb cannot be read ({type(exc).__name__}); "
                                                           "nbgrader cannot grade this submission"))
        release = Path(cd.format_path(cd.release_directory, ".", assignment))
        source = Path(cd.format_path(cd.source_directory, ".", assignment))
        known_files = set()
        for base in (release, source):
            if base.exists():
                known_files |= {str(p.relative_to(base)) for p in base.rglob("*")}
        entries = []
        for dirpath, dirnames, filenames in os.walk(sub, followlinks=False):
            entries += [Path(dirpath) / n for n in dirnames + filenames]
        for p in sorted(entries):
            rel = str(p.relative_to(sub))
            if p.is_symlink():
                # nbgrader copies a submission's files with shutil.copy, which follows links: a link to
                # ../../../source/... would hand the instructor's file to the student's code. Replace it.
                target = os.readlink(p)
                p.unlink()
                p.write_text(f"This was a symbolic link to {target}; the grader replaced it.\n")
                flags.append(_flag("extra_file", f"{rel} was a symbolic link to {target} (replaced by a note "
                                                 "before grading)"))
                continue
            if p.suffix == ".ipynb" and p.parent == sub or rel in known_files or ".ipynb_checkpoints" in p.parts \
                    or "__pycache__" in p.parts or rel == "timestamp.txt":
                continue
            if p.name in SHADOWING or p.parts[len(sub.parts)] in SHADOWING:
                flags.append(_flag("extra_file", f"{rel} would shadow a Python module the grader or the notebook "
                                                 "imports"))
            elif p.is_file():
                flags.append(_flag("extra_file", f"{rel} is not part of the assignment"))
        report.set_submission_flags(cd.root, assignment, student, flags)
