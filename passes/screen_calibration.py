"""The screen's correction and stated error, learned per program from its compiled candidates.

The analytic screen (`passes.screen`) is exact for the training state (parameters, optimizer
state, batch) and approximate for the rest: activations, temporaries, time. What it misses
is mostly particular to the program and the kind of plan (how XLA fuses this model's
kernels, what a pipeline's loops keep), so each compiled candidate teaches a ratio:

  memory  (compiled - exact state) / (screened - exact state)
  time    compiled estimate / screened estimate

An uncompiled candidate takes the ratios of its nearest compiled candidate of its kind
(`distance`: plans differing in fewer and smaller knobs are nearer; none of its kind: the raw
screen). The stated error is measured the same
way, leaving each compiled candidate out in turn and predicting it from the others; the
largest such error (times a safety factor; for memory never below what the raw screen is known
to miss, MEMORY_FLOOR) is what the search's bounds use. The memory error
is relative to the part of memory the screen does not know exactly (compiled - exact state):
the state itself has none. Until enough candidates are compiled to measure it, a prior stands
in (PRIOR_*), and so it does for a candidate whose nearest compiled one differs from it in
kind (`same_kind`: a pipeline against none or another schedule, another precision; for
memory also another recomputation policy): the errors measured among the compiled ones say
nothing about such a candidate; the left-out errors are measured between candidates of one
kind, and each kind states its own. A kind whose left-out corrections were no better on
average than its raw screen keeps the raw screen (`raw_kinds`), and states the raw error.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from passes.plan import Plan

# Until MIN_SAMPLES candidates are compiled, these stand for the screen's relative error: the
# raw screen's worst errors over the benchmark programs (benchmarks/screen_accuracy.py, every
# candidate of two models compiled), times SAFETY, rounded up: memory 26.1% -> 0.35; time
# 10.8% (the small model's TP 8, full recomputation; pipelines at most 8.3%) -> 0.15.
PRIOR_MEMORY_ERROR = 0.35
PRIOR_TIME_ERROR = 0.15
MIN_SAMPLES = 2  # left-out predictions of a kind needed before its error is measured
SAFETY = 1.25   # the stated error is the worst left-out error times this
FLOOR = 0.02    # and never below this (time)
# A kind's stated memory error is never below what the raw screen is known to miss: a few
# compiled candidates of a kind, predicted from one another, do not show the rest of the
# kind's error. The raw screen's worst error (of the part it does not know exactly) over every
# compiled candidate of four Llamas (`benchmarks/screen_accuracy.py --models
# small,100m,gqa,heads6`, 585 candidates; gqa and heads6 held out of the screen's design):
# 11.1% (a 1F1B plan of gqa), and 6.5, 7.1 and 5.6% on the others, where the left-out errors of
# the 2-6 candidates each screened search compiled had stated 2%.
MEMORY_FLOOR = 0.12


def _pipeline(plan: Plan):
  """The kind of pipeline: None, or its schedule (GPipe keeps a stash of every tick's residuals
  beside the stage loops, 1F1B a ring of them inside one loop: the screen's memory errors on
  the two differ even in sign, +14% and -16% on the small Llama's full-recompute plans)."""
  return plan.schedule if plan.pp > 1 else None


def same_kind(a: Plan, b: Plan, what: str) -> bool:
  """Whether compiled candidate `b` says something about `a`'s `what` ('memory' or 'time'):
  the same kind of pipeline (and schedule) and precision, and for memory the same
  recomputation (the screen's FLOPs are exact for any recomputation; its residuals are not)."""
  same = _pipeline(a) == _pipeline(b) and a.bf16 == b.bf16
  return same and (what == "time" or a.recompute == b.recompute)


def distance(a: Plan, b: Plan) -> float:
  """How unlike two plans are, for choosing whose correction an uncompiled plan takes."""
  log2 = lambda x, y: abs(math.log2(x) - math.log2(y))
  d = 4.0 * (a.recompute != b.recompute) + 4.0 * (_pipeline(a) != _pipeline(b)) + 3.0 * (a.bf16 != b.bf16)
  d += 2.0 * (a.fsdp != b.fsdp) + 1.0 * (a.low_prec != b.low_prec) + 2.0 * ((a.tp > 1) != (b.tp > 1))
  d += 0.5 * (log2(a.tp, b.tp) + log2(a.pp, b.pp) + log2(a.mb, b.mb) + log2(a.dp, b.dp))
  return d


@dataclasses.dataclass(frozen=True)
class Sample:
  """One compiled candidate: its screened and compiled figures."""
  plan: Plan
  exact: float           # the screen's exact state bytes
  screened_memory: float
  compiled_memory: float
  screened_time: float
  compiled_time: float

  @property
  def memory_ratio(self) -> float:
    var = self.screened_memory - self.exact
    return (self.compiled_memory - self.exact) / var if var > 0 else 1.0

  @property
  def time_ratio(self) -> float:
    return self.compiled_time / self.screened_time if self.screened_time > 0 else 1.0


def kind(plan: Plan, what: str) -> tuple:
  """The kind of a plan for `what` (`same_kind`): plans of one kind share a stated error."""
  return ((_pipeline(plan), plan.bf16) + ((plan.recompute,) if what == "memory" else ()))


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Corrections of the screen and its stated relative errors (module doc).

  Attributes:
    samples: the compiled candidates it learned from.
    memory_errors: stated relative error of a corrected memory prediction's inexact part
      (all but the parameters, optimizer state and batch), per kind (`kind`) measured.
    time_errors: the same for time.
    raw_kinds: (what, kind) pairs whose left-out corrected predictions were no better on
      average than the raw screen's on the same candidates: those keep the raw screen (a correction that
      did not predict its own kind would worsen what the screen had right).
  """
  samples: tuple[Sample, ...] = ()
  memory_errors: dict = dataclasses.field(default_factory=dict)
  time_errors: dict = dataclasses.field(default_factory=dict)
  raw_kinds: frozenset = frozenset()

  @property
  def memory_error(self) -> float:
    """The largest stated memory error (the prior until one is measured)."""
    return max(self.memory_errors.values(), default=PRIOR_MEMORY_ERROR)

  @property
  def time_error(self) -> float:
    """The largest stated time error (the prior until one is measured)."""
    return max(self.time_errors.values(), default=PRIOR_TIME_ERROR)

  def __repr__(self):
    return (f"Calibration(samples={len(self.samples)}, memory_error={self.memory_error:.1%}, "
            f"time_error={self.time_error:.1%})")

  @classmethod
  def fit(cls, samples: Sequence[Sample]) -> "Calibration":
    """Each kind's error: its members predicted from the others of their kind (leave one out),
    the worst times SAFETY (at least MEMORY_FLOOR for memory, FLOOR for time), once MIN_SAMPLES
    members are compiled."""
    samples = tuple(samples)
    errors = {"memory": {}, "time": {}}
    raw_errors = {"memory": {}, "time": {}}
    for i, s in enumerate(samples):
      others = samples[:i] + samples[i + 1:]
      for what in ("memory", "time"):
        near = _nearest(s.plan, others, what)
        if near is None or not same_kind(s.plan, near.plan, what):
          continue
        if what == "memory":
          var = s.screened_memory - s.exact
          actual = s.compiled_memory - s.exact
          err = abs(var * near.memory_ratio - actual) / max(actual, 1.0)
          raw = abs(var - actual) / max(actual, 1.0)
        else:
          err = abs(s.screened_time * near.time_ratio - s.compiled_time) / s.compiled_time
          raw = abs(s.screened_time - s.compiled_time) / s.compiled_time
        k = kind(s.plan, what)
        errors[what].setdefault(k, []).append(err)
        raw_errors[what].setdefault(k, []).append(raw)
    # A kind keeps the raw screen where correcting did not beat it on the left-out candidates
    # (on average), and states the worst left-out error of what it uses.
    measured = [(what, k) for what in errors for k in errors[what] if len(errors[what][k]) >= MIN_SAMPLES]
    raw_kinds = frozenset((what, k) for what, k in measured if sum(raw_errors[what][k]) <= sum(errors[what][k]))
    stated = {"memory": {}, "time": {}}
    for what, k in measured:
      used = raw_errors[what][k] if (what, k) in raw_kinds else errors[what][k]
      stated[what][k] = max(MEMORY_FLOOR if what == "memory" else FLOOR, SAFETY * max(used))
    return cls(samples, stated["memory"], stated["time"], raw_kinds)

  def memory(self, plan: Plan, exact: float, screened: float) -> float:
    """The corrected memory prediction (bytes): the screen's, scaled by the nearest compiled
    candidate of its kind (unscaled when there is none)."""
    near = _nearest(plan, self.samples, "memory")
    ok = near is not None and same_kind(plan, near.plan, "memory") and ("memory", kind(plan, "memory")) \
        not in self.raw_kinds
    return exact + (screened - exact) * (near.memory_ratio if ok else 1.0)

  def time(self, plan: Plan, screened: float) -> float:
    """The corrected time prediction (seconds), as `memory`."""
    near = _nearest(plan, self.samples, "time")
    ok = near is not None and same_kind(plan, near.plan, "time") and ("time", kind(plan, "time")) not in self.raw_kinds
    return screened * (near.time_ratio if ok else 1.0)

  def errors(self, plan: Plan) -> tuple[float, float]:
    """(memory, time) relative errors stated for this plan: those measured on its kind, or the
    priors when not enough of its kind are compiled (module doc)."""
    return (self.memory_errors.get(kind(plan, "memory"), PRIOR_MEMORY_ERROR),
            self.time_errors.get(kind(plan, "time"), PRIOR_TIME_ERROR))

  def memory_bounds(self, plan: Plan, exact: float, screened: float) -> tuple[float, float]:
    """(lowest, highest) memory the plan may need under its stated error: the exact state plus
    the corrected rest, give or take the error."""
    var = self.memory(plan, exact, screened) - exact
    err = self.errors(plan)[0]
    return exact + max(0.0, var * (1 - err)), exact + var * (1 + err)

  def time_lower(self, plan: Plan, screened: float) -> float:
    """The fastest the plan may be under its stated error."""
    return self.time(plan, screened) * (1 - self.errors(plan)[1])


def _nearest(plan: Plan, samples: Sequence[Sample], what: str) -> Sample | None:
  """The compiled candidate whose ratio `plan` takes for `what`: of its kind if any, nearest."""
  if not samples:
    return None
  return min(samples, key=lambda s: (not same_kind(plan, s.plan, what), distance(plan, s.plan), s.compiled_time))
