"""What crosses the sandbox wall: names and formats both sides use (standard library only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum, StrEnum

EVIDENCE_MIME = "application/vnd.course.evidence+json"
"""MIME type of the display outputs that carry a test cell's observations from the kernel to the grader."""

SANDBOX_OPT_OUT_EVENT = "sandbox.off"
"""Audit event the launcher writes when it runs the kernel without bubblewrap."""


class ValueTag(StrEnum):
    """The ``"t"`` of a value summary: what the kernel's probe saw (``kernel.probe.summarize``), which the
    grader decodes (``evidence.judge.decode``). Other keys: ``v`` value, ``n`` length, ``h`` hash, ``dt``
    dtype, ``sh`` shape, ``k`` array kind or sequence kind, ``st`` statistics, ``id``/``ty``/``mro``/``main``
    identity, type and whether the type was defined in the notebook."""

    CONST = "c"  # None, True, False
    INT = "i"  # an int (as a string beyond 2**53)
    FLOAT = "f"  # a float (repr for inf and nan)
    STR = "s"  # text, cut at 4000 characters (with a hash of the whole)
    COMPLEX = "x"
    ARRAY = "a"  # a tensor or ndarray: dtype, shape, values (sampled beyond 4096) and statistics
    SEQUENCE = "q"  # list, tuple, torch.Size, dict keys or values
    SET = "set"
    DICT = "d"
    TYPE = "type"  # a class: its qualified name and MRO
    KEY = "k"  # a torch dtype or device, a numpy dtype
    OPAQUE = "o"  # anything else: only its type and truth value


class FlagKind(StrEnum):
    """What looked like interference, with the sentence the integrity report shows for it."""

    text: str

    def __new__(cls, value: str, text: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.text = text
        return member

    CHANGED_LOCKED_CELL = ("changed_locked_cell", "a locked cell (setup or test) was changed")
    DAMAGED_METADATA = ("damaged_metadata", "nbgrader metadata was damaged (repaired before grading)")
    DUPLICATE_CELL = ("duplicate_cell", "a graded cell appears more than once")
    MISSING_CELL = ("missing_cell", "a graded cell is missing")
    TEST_CELL_WITHOUT_METADATA = ("test_cell_without_metadata", "a test cell lost its nbgrader metadata")
    CELL_TYPE_CHANGED = ("cell_type_changed", "a graded cell changed type (code/markdown)")
    REORDERED_CELLS = ("reordered_cells", "graded cells are out of order")
    UNKNOWN_GRADE_ID = ("unknown_grade_id", "a cell claims a grade_id the assignment does not have")
    IPYTHON_HOOK = ("ipython_hook", "hook into IPython (input transformers, exception handlers, ...)")
    INTERPRETER_HOOK = ("interpreter_hook", "hook into the interpreter (trace, excepthook, frames, ctypes, gc, ...)")
    TRACE_HOOK = ("trace_hook", "trace or profile function installed")
    PATCHED_FUNCTION = ("patched_function", "library or builtin function replaced")
    IMPORT_HOOK = ("import_hook", "import hook installed")
    SIGNAL_HANDLER = ("signal_handler", "signal handler changed")
    THREAD = ("thread", "background thread started")
    FILE_ACCESS = ("file_access", "files outside the notebook's folder")
    NETWORK = ("network", "network access")
    PROCESS = ("process", "processes, signals or exit")
    DYNAMIC_CODE = ("dynamic_code", "code built at run time (exec, eval, __import__, ...)")
    COMPARISON_FORGED = ("comparison_forged", "a check reported success that its own values contradict")
    TEST_VALUES_DIFFER = ("test_values_differ", "the test's own values differ from the reference run")
    FORGED_EVIDENCE = ("forged_evidence", "evidence the grader did not ask for")
    HIDDEN_FAILURE = ("hidden_failure", "a test cell stopped without showing an error")
    PROBE_MISSING = ("probe_missing", "the end-of-notebook probe did not report")
    KERNEL_STOPPED = ("kernel_stopped", "the kernel died or stopped answering")
    OUTPUT_FLOOD = ("output_flood", "too much output (truncated)")
    AUDIT_CHANNEL = ("audit_channel", "the audit channel was closed by the notebook")
    NO_SANDBOX = ("no_sandbox", "graded WITHOUT the sandbox (COURSE_SANDBOX=off)")
    MISSING_NOTEBOOK = ("missing_notebook", "a notebook of the assignment was not submitted")
    UNKNOWN_NOTEBOOK = ("unknown_notebook", "a notebook the assignment does not have (renamed?)")
    INVALID_NOTEBOOK = ("invalid_notebook", "a notebook that is not valid JSON / nbformat")
    EXTRA_FILE = ("extra_file", "a file the assignment does not have")
    GRADER_ERROR = ("grader_error", "the grader itself failed while judging (scored zero, fail closed)")


class FlagSource(StrEnum):
    """How a flag was found (the report says how far to trust it)."""

    STRUCTURE = "structure"  # the submitted file's cells and metadata, read by the grader
    STATIC = "static"  # a scan of the submitted code
    RUNTIME = "runtime"  # the audit stream, which leaves the kernel as events happen
    EVIDENCE = "evidence"  # the grader's own check of the test cells
    PROBE = "probe"  # the kernel's report on itself (code written against it can fake it)
    EXECUTION = "execution"  # what the grader saw of the kernel


@dataclass(frozen=True)
class Flag:
    """One entry of a notebook's ``flags`` in the integrity record."""

    kind: FlagKind
    source: FlagSource
    detail: str
    where: str = ""

    def to_json(self) -> dict:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> Flag:
        return cls(FlagKind(d["kind"]), FlagSource(d["source"]), d.get("detail", ""), d.get("where", ""))
