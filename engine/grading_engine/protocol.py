"""What crosses the sandbox wall: names and formats both sides use (standard library only)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from enum import Enum, StrEnum

EVIDENCE_MIME = "application/vnd.course.evidence+json"
"""MIME type of the display outputs that carry a test cell's observations from the kernel to the grader.
The data is a JSON list of records (objects; see :func:`evidence_records`)."""


def evidence_records(payload) -> list[dict]:
    """The records of one evidence output's data (:data:`EVIDENCE_MIME`): a list of objects, or its JSON text.
    Anything else (what a notebook may publish under this type) holds no record."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return []
    if not isinstance(payload, list):
        return []
    return [r for r in payload if isinstance(r, dict)]


def import_preload(entry: str) -> None:
    """Import one entry of a kernel's preload list: ``module`` (``import module``), or ``module:name``
    (``from module import name``). The second form resolves what a package loads only when the name is
    first read (transformers' classes, about 1.2 s for ``PreTrainedModel``), so that a warm kernels' server
    pays for it once rather than every kernel. Raises what the import raises."""
    import importlib

    module, _, name = entry.partition(":")
    mod = importlib.import_module(module)
    if name:
        try:
            getattr(mod, name)
        except AttributeError:  # ``from package import submodule``
            importlib.import_module(f"{module}.{name}")


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
    ARRAY = "a"  # a tensor or ndarray: dtype, shape, values (sampled beyond 16384) and statistics
    SEQUENCE = "q"  # list, tuple, torch.Size, dict keys or values
    SET = "set"
    DICT = "d"
    TYPE = "type"  # a class: its qualified name and MRO
    KEY = "k"  # a torch dtype or device, a numpy dtype
    OPAQUE = "o"  # anything else: only its type and truth value
    RAISED = "r"  # evaluating the value raised: the exception's type (``e``) and message (``m``)


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


# --------------------------------------------------------------------------- warm kernels
# The launcher of a kernel (outside the sandbox) asks the fork server inside it
# (grading_engine.kernel.warm) for one kernel: one WarmRequest, as one SOCK_SEQPACKET message, with the
# kernel's stdout, stderr and audit pipe as SCM_RIGHTS; the server's child answers with WarmReply messages.

PACKAGE_DIRS_ENV = "COURSE_PACKAGE_DIRS"
"""The kernel's environment variable that names the folders of the packages the notebooks import
(``GradingEngine.sandbox_packages``, ``os.pathsep``-separated): the launcher sets it, sandboxed or not, and
the kernel's audit counts reading them as normal (a warm kernel whose server did not import a package
reads its files on the first import; a cold one reads them while preloading)."""
GRADING_KERNEL_ARGS = ("--HistoryManager.enabled=False",)
"""Arguments every kernel the grader starts gets (sandboxed or forked plain): no IPython history database,
which a kernel writes on a thread after every cell (a graded notebook's history is the notebook)."""
SANDBOX_HOME = "/home/student"
"""The kernel's ``$HOME`` inside the sandbox; the copy of the notebook's folder is a folder of it."""
SANDBOX_RUN = "/run/kernel"
"""The kernel's connection file and sockets inside the sandbox."""
WARM_DIR = "/run/warm"
"""Where the fork server sees its host folder: its socket and one folder per kernel (``k/<id>``)."""
WARM_SOCKET = "server.sock"
WARM_KERNELS = "k"


@dataclass(frozen=True)
class WarmRequest:
    """One kernel, from the launcher. ``kernel_id`` names its folder ``k/<id>`` (``home``, ``run``,
    ``etc``) made and filled by the launcher; ``uid`` is the uid to drop to when the server runs as root
    (None: keep the server's); ``rlimits`` maps ``resource.RLIMIT_*`` names to (soft, hard)."""

    kernel_id: str
    workdir_name: str
    env: dict[str, str]
    rlimits: dict[str, tuple[int, int]]
    tmp_mb: int
    kernel_args: list[str]
    preload: list[str] | None
    watch: list[str]
    uid: int | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WarmRequest:
        """The request, checked field by field (an unknown or mistyped field is an error)."""
        d = json.loads(data)
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise ValueError(f"warm request: expected the fields {sorted(names)}, got {sorted(d) if isinstance(d, dict) else d!r}")
        ok = (isinstance(d["kernel_id"], str) and d["kernel_id"] != ""
              and all(c.isalnum() or c in "-_" for c in d["kernel_id"])
              and isinstance(d["workdir_name"], str) and "/" not in d["workdir_name"] and d["workdir_name"] not in ("", ".", "..")
              and isinstance(d["env"], dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in d["env"].items())
              and isinstance(d["rlimits"], dict) and all(
                  k.startswith("RLIMIT_") and isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)
                  for k, v in d["rlimits"].items())
              and type(d["tmp_mb"]) is int and isinstance(d["kernel_args"], list)
              and all(isinstance(a, str) for a in d["kernel_args"])
              and (d["preload"] is None or all(isinstance(m, str) for m in d["preload"]))
              and all(isinstance(m, str) for m in d["watch"]) and (d["uid"] is None or type(d["uid"]) is int))
        if not ok:
            raise ValueError(f"warm request: a field has the wrong type or value: {data[:300]!r}")
        d["rlimits"] = {k: (v[0], v[1]) for k, v in d["rlimits"].items()}
        return cls(**d)


class WarmEvent(StrEnum):
    STARTED = "started"  # sent by the kernel process itself (its credentials give the launcher its pid)
    FAILED = "failed"  # the child could not set up its walls: the launcher starts a cold sandbox instead
    EXITED = "exited"  # the kernel process ended, with its exit code


@dataclass(frozen=True)
class WarmReply:
    event: WarmEvent
    code: int = 0
    detail: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps({"event": self.event.value, "code": self.code, "detail": self.detail}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WarmReply:
        d = json.loads(data)
        if not isinstance(d, dict) or set(d) != {"event", "code", "detail"} or type(d["code"]) is not int \
                or not isinstance(d["detail"], str):
            raise ValueError(f"warm reply: unexpected message {data[:200]!r}")
        return cls(WarmEvent(d["event"]), d["code"], d["detail"])
