"""The time plan of gpu_check.sh: every command a run makes, in running order, grouped by phase, each with the
seconds it wants and the seconds it needs at least (``least``: below that the command is pointless).

Three rules keep every command at its ``least`` however long the commands before it take within their caps:

- a phase's floor is the sum of the ``least`` of its steps (computed, never written by hand);
- a phase starts by fixing its end: now plus the sum of its steps' wants, or earlier so that every later
  selected phase keeps its floor and the summary keeps SUMMARY_RESERVE;
- each step's cap is its want, or less so that the phase's later steps keep their ``least`` and the phase
  ends by its end.

So a run that starts with the sum of all floors gives every step at least its ``least``, and a command cut at
its cap never eats a later one's time (``Runner.wait`` stops a command within its cap, its grace included).
tests/benchmarks/test_gpu_check.py::test_every_step_gets_its_least_when_every_command_uses_its_cap runs the
whole schedule on a fake clock. The ``least`` values are estimates (no GPU run has timed them yet); the
phases' wants are the longest each should take.
"""

from __future__ import annotations

import collections

SUMMARY_RESERVE = 5.0
#: the extension build's own cap (it runs in the background from the install phase on)
BUILD_CAP = 300.0
#: the phases in running order; ``beside-build`` is the Triton tests run while the build goes on, ``build`` the
#: wait for the build and the check of what it made
PHASES = ("env", "install", "kernels", "beside-build", "build", "parity", "sanitize", "bench")

Step = collections.namedtuple("Step", "name want least")

#: per phase, its steps in order: (name, want on a GPU, want in a dry run, least); a want of 0 = not in that mode
STEPS = {
    "env": (("env", 60, 60, 20),),
    "install": (("wheels", 60, 60, 20), ("imports", 30, 60, 10), ("extension", 60, 120, 10)),
    "kernels": (("kernels", 120, 300, 20),),
    # optional: the device-agnostic Triton tests also run in CI under the interpreter; they get what is left
    "beside-build": (("triton-any-device", 90, 0, 0),),
    # the wait for the build (it has been running since the install phase: beside kernels and the Triton tests)
    "build": (("build", BUILD_CAP, 0, 30), ("extension", 60, 0, 10)),
    "parity": (("kernels", 180, 120, 60), ("model", 60, 120, 20)),
    "sanitize": (("extension", 60, 60, 10), ("memcheck", 60, 0, 30), ("racecheck", 60, 0, 30), ("cpu", 0, 60, 20)),
    "bench": (
        ("linear", 100, 120, 40),  # the 1.15x Linear goal: it keeps back only the least of the runs after it
        ("conv", 110, 120, 30),
        ("sweep", 50, 120, 15),
        ("imports", 30, 60, 10),
        ("pipeline", 120, 240, 45),
    ),
}


class Plan:
    """The caps of one run (``run``: a ``gpu_check.Runner``). ``issued`` lists every step handed a cap, in
    order, as ``(phase, step, cap, want, least)``."""

    def __init__(self, run):
        self.run = run
        self.ends: dict[str, float] = {}
        self.issued: list[tuple[str, str, float, float, float]] = []

    # what applies -----------------------------------------------------------------------------------

    def selected(self, phase: str) -> bool:
        args = self.run.args
        if phase == "env":
            return True
        if phase == "beside-build":
            return "parity" in args.stages and not self.run.dry
        if phase == "build":
            return "install" in args.stages and not self.run.dry and not args.no_build
        return phase in args.stages

    def _applies(self, phase: str, step: str) -> bool:
        run = self.run
        if (phase, step) == ("install", "wheels"):
            return bool(run.args.wheels)
        if (phase, step) == ("install", "extension"):
            return run.dry or run.args.no_build
        if (phase, step) == ("sanitize", "extension"):
            return run.extension is None
        if (phase, step) == ("bench", "imports"):
            return run.have_model_deps is None
        if (phase, step) == ("bench", "pipeline"):
            return run.have_model_deps is not False
        return True

    def steps(self, phase: str) -> list[Step]:
        """The steps of ``phase`` that apply now (what is not known yet counts as applying: floors only shrink
        as a run learns more)."""
        out = []
        for name, gpu_want, dry_want, least in STEPS[phase]:
            want = dry_want if self.run.dry else gpu_want
            if want and self._applies(phase, name):
                if (phase, name) == ("build", "build") and self.run.build_started is not None:
                    want = max(0.0, BUILD_CAP - (self.run.now() - self.run.build_started))
                out.append(Step(name, float(want), float(least)))
        return out

    def floor(self, phase: str) -> float:
        return sum(s.least for s in self.steps(phase)) if self.selected(phase) else 0.0

    def reserve_after(self, phase: str) -> float:
        """Seconds kept for the selected phases after ``phase`` and the summary."""
        return SUMMARY_RESERVE + sum(self.floor(p) for p in PHASES[PHASES.index(phase) + 1 :])

    # caps -------------------------------------------------------------------------------------------

    def begin(self, phase: str) -> float:
        """Fixes and returns ``phase``'s end (monotonic seconds)."""
        now = self.run.now()
        want = sum(s.want for s in self.steps(phase))
        self.ends[phase] = min(now + want, self.run.deadline - self.reserve_after(phase))
        return self.ends[phase]

    def cap(self, phase: str, step: str) -> float:
        """Seconds for ``step`` of ``phase``: its want, or less so that the phase's later steps keep their
        ``least`` and the phase ends by its end (0: no time left, the step is not run)."""
        if phase not in self.ends:
            self.begin(phase)
        steps = self.steps(phase)
        names = [s.name for s in steps]
        if step not in names:
            raise KeyError(f"{phase}/{step} is not a step of this run (steps: {names})")
        i = names.index(step)
        later = sum(s.least for s in steps[i + 1 :])
        cap = max(0.0, min(steps[i].want, self.ends[phase] - self.run.now() - later))
        self.issued.append((phase, step, cap, steps[i].want, steps[i].least))
        return cap

    def total_floor(self) -> float:
        return SUMMARY_RESERVE + sum(self.floor(p) for p in PHASES)
