"""Which candidates to compile: those the screen cannot rule out, best first, until none can win.

Every candidate is screened (`passes.screen`); only XLA decides that a plan fits. In waves:

  1. the screen's calibration (`passes.screen_calibration`) turns each uncompiled candidate's
     screened figures into a prediction with bounds under its stated error;
  2. a candidate whose exact training state (parameters, optimizer state, batch) is over the
     budget, or whose lowest possible memory is, is left out as over budget (predicted);
  3. one that cannot beat the best compiled feasible plan even at its lowest possible time is
     left out as pruned (predicted). No plan is assumed slower for saving memory: under the
     cost model more micro-batches can be faster (one gradient reduction per step instead of
     one per layer), so only the screen's bounds prune;
  4. the rest are contenders: the `wave` best by predicted time are compiled (those predicted
     to fit first: what they teach the calibration may rule out the doubtful ones), their
     figures refine the calibration, and the next wave starts.

The search stops when no contender is left. When nothing compiled fits, the candidates with
the least predicted memory are compiled before giving up, so that "no plan fits" rests on
XLA's analysis too. Every candidate comes back with its verdict and reason, its figures
marked 'compiled' or 'predicted'.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from passes.plan import Plan
from passes.report import (FEASIBLE, OVER_BUDGET, PREDICTED, PRUNED, CandidateResult, fmt_bytes, fmt_time)
from passes.screen import Screened
from passes.screen_calibration import Calibration, Sample

log = logging.getLogger("ap_xla")

CompileAll = Callable[[Sequence[Plan]], list]


def _sample(s: Screened, r: CandidateResult) -> Sample | None:
  if r.memory_bytes is None or r.est_time_s is None:
    return None
  return Sample(s.plan, s.persistent_bytes, s.memory_bytes, r.memory_bytes, s.est_time_s, r.est_time_s)


def _best(compiled) -> CandidateResult | None:
  ok = [r for r in compiled.values() if r.verdict == FEASIBLE and r.est_time_s is not None]
  return min(ok, key=lambda r: r.est_time_s) if ok else None


def _judge(p: Plan, s: Screened, cal: Calibration, budget: int, best) -> CandidateResult | None:
  """The predicted verdict of an uncompiled candidate, or None when it is a contender."""
  exact = s.persistent_bytes
  mem = cal.memory(p, exact, s.memory_bytes)
  lo, _ = cal.memory_bounds(p, exact, s.memory_bytes)
  t = cal.time(p, s.est_time_s)
  t_lo = cal.time_lower(p, s.est_time_s)
  mem_err, time_err = cal.errors(p)
  figures = dict(memory_bytes=int(mem), est_time_s=t, figures=PREDICTED,
                 details={"screen": screen_details(s), "predicted": {"memory_bytes": int(mem), "est_time_s": t}})
  if exact > budget:
    return CandidateResult(p, OVER_BUDGET, reason=f"not compiled: parameters, optimizer state and batch alone "
                           f"need {fmt_bytes(exact)} per device, over the budget by {fmt_bytes(exact - budget)} "
                           "(exact)", **figures)
  if lo > budget:
    return CandidateResult(p, OVER_BUDGET, reason=f"not compiled: predicted {fmt_bytes(mem)}, at least "
                           f"{fmt_bytes(lo)} under the screen's {mem_err:.0%} error, over the budget",
                           **figures)
  if best is not None and t_lo >= best.est_time_s:
    return CandidateResult(p, PRUNED, reason=f"not compiled: predicted {fmt_time(t)}, at least {fmt_time(t_lo)} "
                           f"under the screen's {time_err:.0%} error, cannot beat {best.plan} "
                           f"({fmt_time(best.est_time_s)}, compiled)", **figures)
  return None


def screen_details(s: Screened) -> dict:
  """The screened figures of a candidate, for the report's details."""
  return {"memory": {k: int(v) for k, v in s.memory.items()}, "memory_bytes": s.memory_bytes,
          "est_time_s": s.est_time_s, "compute_s": s.cost.compute_s, "comm_s": s.cost.comm_s,
          "comm_by_kind": dict(s.cost.comm_by_kind), "largest_temporary": s.temporaries_detail}


def screened_evaluate(plans: Sequence[Plan], screened: dict, compile_all: CompileAll, budget: int,
                      wave: int) -> tuple[list[CandidateResult], Calibration]:
  """Compiles the candidates that can win (module doc); the others get predicted verdicts.

  Args:
    plans: every candidate of the space.
    screened: `Screened` per plan.
    compile_all: compiles a list of plans (in parallel) and returns their results in order.
    budget: per-device bytes a plan may use.
    wave: candidates compiled per wave (the compile workers).

  Returns:
    (one result per plan in order, the final calibration).
  """
  wave = max(1, wave)
  compiled: dict[Plan, CandidateResult] = {}
  samples: list[Sample] = []
  cal = Calibration.fit(samples)
  confirmed = False

  def run(batch):
    nonlocal cal
    for r in compile_all(batch):
      compiled[r.plan] = r
      s = _sample(screened[r.plan], r)
      if s is not None:
        samples.append(s)
    cal = Calibration.fit(samples)
    log.debug("compiled %s; %r", [p for p in batch], cal)

  while True:
    best = _best(compiled)
    contenders = [p for p in plans if p not in compiled and _judge(p, screened[p], cal, budget, best) is None]
    if contenders:
      # The likely feasible first: what they teach the calibration may rule out the doubtful.
      def order(p):
        s = screened[p]
        mem = cal.memory(p, s.persistent_bytes, s.memory_bytes)
        return (mem > budget, cal.time(p, s.est_time_s), mem)
      contenders.sort(key=order)
      run(contenders[:wave])
      continue
    if best is not None or confirmed:
      break
    # Nothing compiled fits: let XLA confirm with the least predicted memory before giving up
    # (one candidate when even the exact state of every plan is over the budget).
    confirmed = True
    rest = [p for p in plans if p not in compiled]
    rest.sort(key=lambda p: cal.memory(p, screened[p].persistent_bytes, screened[p].memory_bytes))
    if not rest:
      break
    possible = [p for p in rest if screened[p].persistent_bytes <= budget]
    run(possible[:wave] or rest[:1])
  best = _best(compiled)
  out = []
  for p in plans:
    if p in compiled:
      r = compiled[p]
      if p in screened and r.memory_bytes is not None:
        r.details["screen"] = screen_details(screened[p])
      out.append(r)
    else:
      out.append(_judge(p, screened[p], cal, budget, best) or CandidateResult(
          p, PRUNED, reason="not compiled", figures=PREDICTED))
  return out, cal
