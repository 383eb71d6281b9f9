"""Which candidates to compile: families, memory-saving variants, and a branch-and-bound.

A *family* is a set of plans that differ only in knobs that trade time for memory:
recomputation ('none' < 'dots' < 'selective_op' < 'selective_layer' < 'full', by the FLOPs
recomputed) and, without a pipeline, the number of
micro-batches (gradient accumulation). Within a family, more of either knob never makes a
step faster and never makes it bigger, under the cost model and XLA's memory analysis:

  * more recomputation adds FLOPs and shrinks the saved activations (except that
    'selective_layer' may keep more than 'dots' or 'selective_op': the prunings below rely
    on the time order alone, a wave may compile a variant no smaller than the last);
  * more micro-batches (pp == 1) runs the same FLOPs in smaller pieces, with as many
    collectives or more (the FSDP gathers repeat per micro-batch), and shrinks activations.

So `staged_evaluate` compiles the cheapest variant of every family first and goes further
only where that variant is over budget, in waves (the next variant of each open family per
wave), with two prunings:

  fits      once a variant fits, every sibling with at least as much of both knobs is pruned
            (it could only be slower);
  bound     a variant whose estimate cannot beat the best feasible plan found so far is pruned:
            its lower bound is the estimate of a compiled sibling it dominates (the family's
            cheapest variant at least), and memory-saving knobs only add time.

Every pruned candidate is recorded with its reason; nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

from passes.plan import Plan
from passes.recompute import RECOMPUTE_ORDER
from passes.report import FEASIBLE, OVER_BUDGET, PRUNED, CandidateResult, fmt_time

log = logging.getLogger("ap_xla")

# compile_all(plans) -> results in the same order
CompileAll = Callable[[Sequence[Plan]], list]


def family(plan: Plan) -> tuple:
  """The plan with its memory-saving knobs taken out (recompute; mb when there is no pipeline)."""
  d = dataclasses.asdict(plan)
  d.pop("recompute")
  if plan.pp == 1:
    d.pop("mb")
  return tuple(sorted(d.items()))


def savings(plan: Plan) -> tuple[int, int]:
  """(recomputation level, micro-batches): the knobs that trade time for memory."""
  return RECOMPUTE_ORDER[plan.recompute], plan.mb if plan.pp == 1 else 0


def at_least(a: Plan, b: Plan) -> bool:
  """Whether `a` saves at least as much as `b` on every knob (so is no faster, no bigger)."""
  return all(x >= y for x, y in zip(savings(a), savings(b)))


def persistent_bytes(r: CandidateResult) -> int:
  """Argument + output - alias: what a plan holds whatever its temporaries (0 if unknown)."""
  m = r.details.get("memory") or {}
  return m.get("argument", 0) + m.get("output", 0) - m.get("alias", 0)


def _best(results) -> CandidateResult | None:
  ok = [r for r in results if r.verdict == FEASIBLE and r.est_time_s is not None]
  return min(ok, key=lambda r: r.est_time_s) if ok else None


def staged_evaluate(plans: Sequence[Plan], compile_all: CompileAll, budget: int) -> list[CandidateResult]:
  """Compiles the plans a search needs (module doc) and records the others as pruned.

  Args:
    plans: every candidate of the space.
    compile_all: compiles a list of plans (in parallel) and returns their results in order.
    budget: per-device bytes a plan may use.

  Returns:
    One result per plan: compiled ones with their verdicts, the others PRUNED with a reason.
  """
  families: dict[tuple, list[Plan]] = {}
  for p in plans:
    families.setdefault(family(p), []).append(p)
  for members in families.values():
    members.sort(key=savings)
  done: dict[Plan, CandidateResult] = {}
  for r in compile_all([m[0] for m in families.values()]):
    done[r.plan] = r

  open_: dict[tuple, list[Plan]] = {}
  for key, members in families.items():
    head = done[members[0]]
    rest = members[1:]
    if not rest:
      continue
    if head.verdict == OVER_BUDGET and persistent_bytes(head) > budget:
      why = (f"{head.plan} needs {persistent_bytes(head) / 2**20:.1f} MiB for parameters, optimizer "
             "state and batch alone, over the budget; recomputation and micro-batches only shrink "
             "temporaries")
      done.update({p: CandidateResult(p, PRUNED, reason=why) for p in rest})
    elif head.verdict == OVER_BUDGET:
      open_[key] = rest
    else:
      why = (f"{head.plan} fits with less recomputation and fewer micro-batches" if head.verdict == FEASIBLE
             else f"its cheapest variant {head.plan} failed: {head.verdict}")
      done.update({p: CandidateResult(p, PRUNED, reason=why) for p in rest})
  if open_:
    log.info("%d candidates over budget; compiling their memory-saving variants (recomputation, "
             "micro-batches) in waves, pruning those that cannot beat the best feasible plan.", len(open_))

  wave_no = 0
  while open_:
    best = _best(done.values())
    wave = []
    for key in list(open_):
      rest = []
      for p in open_[key]:
        bound = _lower_bound(p, families[key], done)
        if best is not None and bound is not None and bound.est_time_s >= best.est_time_s:
          done[p] = CandidateResult(
              p, PRUNED, reason=f"cannot beat {best.plan} ({fmt_time(best.est_time_s)}): {bound.plan} "
                                f"already estimates {fmt_time(bound.est_time_s)} and more recomputation or "
                                "micro-batches only add time")
        else:
          rest.append(p)
      if rest:
        wave.append(rest[0])
        open_[key] = rest[1:]
      else:
        del open_[key]
    if not wave:
      break
    wave_no += 1
    results = compile_all(wave)
    log.debug("memory-saving wave %d: %d compiled", wave_no, len(results))
    for r in results:
      done[r.plan] = r
      key = family(r.plan)
      if r.verdict == FEASIBLE and key in open_:
        keep = []
        for p in open_[key]:
          if at_least(p, r.plan):
            done[p] = CandidateResult(p, PRUNED, reason=f"{r.plan} fits with less recomputation and "
                                                        "fewer micro-batches")
          else:
            keep.append(p)
        open_[key] = keep
      if key in open_ and not open_[key]:
        del open_[key]
  return [done[p] for p in plans]


def _lower_bound(plan: Plan, members: Sequence[Plan], done: dict) -> CandidateResult | None:
  """The compiled sibling with the highest estimate among those `plan` saves at least as much as."""
  below = [done[m] for m in members if m != plan and m in done and done[m].est_time_s is not None
           and at_least(plan, m)]
  return max(below, key=lambda r: r.est_time_s) if below else None
