"""Register the sandbox and the integrity checks in nbgrader's configuration.

``nbgrader_config.py`` calls :func:`configure`. Two switches, both read from
the environment of the nbgrader process:

* ``COURSE_SANDBOX=off``: run student code without bubblewrap (loud warning);
* ``COURSE_INTEGRITY=off``: no evidence check, no structure/scan/audit flags,
  stock feedback.

With both off, ``nbgrader autograde`` is stock nbgrader.
"""

from __future__ import annotations

import os
import sys


def integrity_requested() -> bool:
    return os.environ.get("COURSE_INTEGRITY", "on").strip().lower() not in {"off", "0", "no", "false"}


def _command() -> str | None:
    for arg in sys.argv[1:3]:
        if not arg.startswith("-"):
            return arg
    return None


def configure(c) -> None:
    """Install the course's preprocessors into nbgrader config ``c``.

    traitlets only logs an exception raised while loading a config file and
    goes on with what it has, which would mean grading without the sandbox
    and without a word: a failure here stops ``nbgrader autograde`` instead.
    """
    try:
        _configure(c)
    except SystemExit:
        raise
    except Exception as exc:
        if _command() == "autograde":
            import traceback

            raise SystemExit("nbgrader_config.py: the course's grading integrity could not be configured, so "
                             "autograde refuses to run:\n" + traceback.format_exc()) from exc
        print(f"WARNING: course integrity configuration failed: {exc!r}", file=sys.stderr)


def _configure(c) -> None:
    from nbgrader.converters import Autograde, GenerateFeedback

    from grading_engine.sandbox import requested as sandbox_requested

    sanitize = list(Autograde.class_traits()["sanitize_preprocessors"].default())
    autograde = list(Autograde.class_traits()["autograde_preprocessors"].default())
    feedback = list(GenerateFeedback.class_traits()["preprocessors"].default())
    integrity = integrity_requested()
    sandbox = sandbox_requested()

    if sandbox or integrity:
        from nbgrader.preprocessors import Execute

        from grading_engine.preprocessors.execute import SandboxedExecute

        autograde = [SandboxedExecute if p is Execute else p for p in autograde]
    if integrity:
        from grading_engine.preprocessors.feedback import SanitizeFeedback
        from grading_engine.preprocessors.guard import GuardSubmission, SubmissionCheck
        from grading_engine.preprocessors.evidence import CheckEvidence, InstrumentTests

        sanitize = [GuardSubmission] + sanitize
        k = next(i for i, p in enumerate(autograde) if getattr(p, "__name__", "") == "SandboxedExecute")
        autograde = autograde[:k] + [InstrumentTests, autograde[k], CheckEvidence] + autograde[k + 1:]
        feedback = feedback[:1] + [SanitizeFeedback] + feedback[1:]
        previous = c.Autograde.get("pre_convert_hook") if "pre_convert_hook" in c.Autograde else None
        c.Autograde.pre_convert_hook = SubmissionCheck(c, chained=previous)
    c.Autograde.sanitize_preprocessors = sanitize
    c.Autograde.autograde_preprocessors = autograde
    c.GenerateFeedback.preprocessors = feedback

    if _command() == "autograde" and (sandbox or integrity):
        # refuse before the first submission is touched, not at the first notebook
        from grading_engine.preprocessors.execute import require_sandbox

        require_sandbox()
