"""Register the grading engine in nbgrader's configuration.

``nbgrader_config.py`` calls :func:`configure`, which installs the engine's
preprocessors and autograde's pre-convert hook. What they do is decided at run
time from the merged configuration, ``GradingEngine`` in ``nbgrader_config.py``
and then on the command line (``nbgrader autograde A --GradingEngine.sandbox=False``):

* ``GradingEngine.sandbox = False``: student code runs without bubblewrap (loud warning);
* ``GradingEngine.evidence = False``: no evidence check, no structure/scan/audit flags,
  stock feedback (every engine preprocessor but Execute is disabled).

With both off, ``nbgrader autograde`` is stock nbgrader. Both take their
defaults from ``COURSE_SANDBOX`` / ``COURSE_INTEGRITY`` when set (``off``).
"""

from __future__ import annotations

import sys
import traceback

from grading_engine.config import FollowsEvidence, GradingEngine


def integrity_requested() -> bool:
    """The default of ``GradingEngine.evidence`` (``COURSE_INTEGRITY``); a configuration may say otherwise."""
    return GradingEngine().evidence


def configure(c) -> None:
    """Install the engine's preprocessors into nbgrader config ``c``.

    traitlets only logs an exception raised while loading a config file and
    goes on with what it has, which would mean grading without the sandbox
    and without a word: a failure here makes ``nbgrader autograde`` refuse
    (through its pre-convert hook, which only autograde calls) and leaves
    every other command working.
    """
    try:
        _configure(c)
    except Exception as exc:
        msg = ("nbgrader_config.py: the grading engine could not be configured, so autograde refuses to run:\n"
               + traceback.format_exc())
        print(f"WARNING: grading engine configuration failed: {exc!r}", file=sys.stderr)
        c.Autograde.pre_convert_hook = Refuse(msg)


class Refuse:
    """A pre-convert hook that stops ``nbgrader autograde`` before its first submission."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, **kwargs) -> None:
        raise SystemExit(self.message)


def _switched(cls: type) -> type:
    """``cls`` (a preprocessor of the evidence checks) enabled when ``GradingEngine.evidence`` is, at run time."""
    return type(cls.__name__, (FollowsEvidence, cls), {"__module__": __name__, "__doc__": cls.__doc__})


def _configure(c) -> None:
    from nbgrader.converters import Autograde, GenerateFeedback
    from nbgrader.preprocessors import Execute

    from grading_engine.preprocessors.evidence import CheckEvidence, InstrumentTests
    from grading_engine.preprocessors.execute import SandboxedExecute
    from grading_engine.preprocessors.feedback import SanitizeFeedback
    from grading_engine.preprocessors.guard import GuardSubmission

    sanitize = list(Autograde.class_traits()["sanitize_preprocessors"].default())
    autograde = list(Autograde.class_traits()["autograde_preprocessors"].default())
    feedback = list(GenerateFeedback.class_traits()["preprocessors"].default())

    k = autograde.index(Execute)
    autograde[k:k + 1] = [InstrumentTests, SandboxedExecute, CheckEvidence]
    c.Autograde.sanitize_preprocessors = [_switched(GuardSubmission)] + sanitize
    c.Autograde.autograde_preprocessors = autograde
    c.GenerateFeedback.preprocessors = feedback[:1] + [_switched(SanitizeFeedback)] + feedback[1:]
    # nbconvert validates the whole notebook after every preprocessor (about 30 times a notebook in autograde's
    # two passes, outputs and evidence included); once after the last of each pass catches the same invalid
    # notebooks, before any student code runs (the first pass ends before Execute). A course's own setting wins.
    if not any("optimistic_validation" in c[name] for name in ("Exporter", "NotebookExporter")
               if name in c):
        c.Exporter.optimistic_validation = True
    previous = c.Autograde.get("pre_convert_hook") if "pre_convert_hook" in c.Autograde else None
    c.Autograde.pre_convert_hook = BeforeAutograde(c, chained=previous)


class BeforeAutograde:
    """``Autograde.pre_convert_hook``: nbgrader calls it before each submission, and only autograde calls it.

    Stops the whole run (``SystemExit``) before the first submission is touched when the sandbox
    is asked for and cannot start; then, with the evidence checks on, the engine's submission check;
    then the course's own hook, if it had one. Inside a server (the formgrader) nbgrader turns the
    ``SystemExit`` into a failed submission.
    """

    def __init__(self, config, chained=None):
        from grading_engine.preprocessors.guard import SubmissionCheck

        self.config = config  # the configuration file's; the running app's (command line merged) wins
        self.chained = chained
        self.check = SubmissionCheck(config)

    def settings(self) -> GradingEngine:
        return GradingEngine(config=running_config() or self.config)

    def __call__(self, assignment=None, student=None, notebooks=None, **kw):
        settings = self.settings()
        if settings.sandbox:
            from grading_engine.preprocessors.execute import require_sandbox

            require_sandbox(settings=settings, fatal=True)
        if settings.evidence:
            self.check(assignment=assignment, student=student, notebooks=notebooks, **kw)
        if self.chained is not None:
            self.chained(assignment=assignment, student=student, notebooks=notebooks, **kw)


def running_config():
    """The configuration of the nbgrader application running in this process (file and command line), if any.

    ``nbgrader autograde`` makes its ``AutogradeApp`` the application instance; a server (the
    formgrader) runs autograde inside its own application, whose configuration is not nbgrader's.
    """
    from nbgrader.apps.baseapp import NbGrader
    from traitlets.config import Application

    if Application.initialized() and isinstance(Application.instance(), NbGrader):
        return Application.instance().config
    return None


def refuse_unless_ready(config) -> None:
    """``SystemExit`` when ``config`` installs the engine, asks for the sandbox, and the sandbox cannot start.

    For a process that grades many submissions with one configuration (the batch worker) and must
    refuse before it reports ready, not at its first submission.
    """
    hook = config.Autograde.get("pre_convert_hook") if "Autograde" in config else None
    if isinstance(hook, Refuse):
        hook()
    if isinstance(hook, BeforeAutograde):
        settings = GradingEngine(config=config)
        if settings.sandbox:
            from grading_engine.preprocessors.execute import require_sandbox

            require_sandbox(settings=settings, fatal=True)
