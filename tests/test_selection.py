"""Which candidates the screened search compiles (no XLA here: a fake screen and compiler).

Each plan of a made-up space has a 'true' memory and time, which the fake compiler returns;
the fake screen sees them through a known error. The tests state what must be compiled,
what may stay predicted, and that the choice is the one compiling everything would make.
"""
import itertools

import pytest

from passes.cost_model import CostEstimate
from passes.plan import Plan
from passes.report import FEASIBLE, OVER_BUDGET, PREDICTED, PRUNED, CandidateResult
from passes.screen import Screened
from passes.selection import screened_evaluate

MB = 2**20
STATE = 10 * MB


def space():
  """48 plans: dp x tp x mb x recompute x fsdp."""
  out = []
  for (dp, tp), mb, r, fsdp in itertools.product(((8, 1), (4, 2), (2, 4)), (1, 2, 4, 8), ("none", "full"),
                                                 (False, True)):
    out.append(Plan(dp=dp, tp=tp, mb=mb, recompute=r, fsdp=fsdp))
  return out


def truth(p: Plan) -> tuple[int, float]:
  """(memory, time) a compile would report: memory-saving knobs shrink memory and cost time."""
  mem = STATE // (p.dp if p.fsdp else 1) + 200 * MB // (p.mb * (4 if p.recompute == "full" else 1) * p.tp)
  t = 1.0 + 0.05 * p.tp + 0.03 * p.mb + (0.3 if p.recompute == "full" else 0) + (0.1 if p.fsdp else 0)
  return mem, t


class Compiler:
  def __init__(self, budget, lie=None):
    self.budget, self.calls, self.lie = budget, [], lie or {}

  def __call__(self, plans):
    self.calls.append(list(plans))
    out = []
    for p in plans:
      mem, t = self.lie.get(p, truth(p))
      verdict = FEASIBLE if mem <= self.budget else OVER_BUDGET
      out.append(CandidateResult(p, verdict, mem, t))
    return out

  @property
  def compiled(self):
    return [p for wave in self.calls for p in wave]


def screened(plans, err=0.03, override=None):
  """The screen: the truth off by a plan-dependent error within `err`; `override` replaces some."""
  out = {}
  for i, p in enumerate(plans):
    mem, t = truth(p)
    f = 1 + err * ((i * 7919) % 13 - 6) / 6  # deterministic, within +-err
    state = STATE // (p.dp if p.fsdp else 1)
    mem_s, t_s = (override or {}).get(p, (state + (mem - state) * f, t * f))
    cost = CostEstimate(compute_s=t_s, comm_s=0.0, bubble_fraction=0.0, total_s=t_s)
    out[p] = Screened(p, {"params": state, "opt_state": 0, "batch": 0, "grads": 0,
                          "saved_activations": mem_s - state, "gathered_params": 0, "temporaries": 0}, cost)
  return out


def exhaustive_choice(plans, budget):
  ok = [(truth(p)[1], truth(p)[0], i, p) for i, p in enumerate(plans) if truth(p)[0] <= budget]
  return min(ok)[3]


@pytest.mark.parametrize("budget", [40 * MB, 70 * MB, 120 * MB])
def test_a_small_fraction_is_compiled_and_the_choice_is_the_exhaustive_one(budget):
  plans = space()
  comp = Compiler(budget)
  results, cal = screened_evaluate(plans, screened(plans), comp, budget, wave=2)
  assert [r.plan for r in results] == plans  # one result per plan, in order
  best = min((r for r in results if r.verdict == FEASIBLE), key=lambda r: (r.est_time_s, r.memory_bytes))
  assert best.plan == exhaustive_choice(plans, budget)
  assert len(comp.compiled) <= len(plans) // 4, comp.compiled
  assert len(set(comp.compiled)) == len(comp.compiled)  # nothing compiled twice
  # every candidate says where its figures come from; the predicted ones why they were left out
  for r in results:
    if r.plan in comp.compiled:
      assert r.figures == "compiled"
    else:
      assert r.figures == PREDICTED and r.verdict in (PRUNED, OVER_BUDGET) and "not compiled" in r.reason
      assert r.memory_bytes > 0 and r.est_time_s > 0
  assert cal.samples and 0 < cal.time_error < 0.2


def test_a_candidate_the_screen_misjudges_is_caught_by_the_compile_check():
  plans = space()
  budget = 70 * MB
  liar = Plan(dp=8, tp=1, mb=1, recompute="none", fsdp=False)  # the screen: small and fastest
  over = {liar: (STATE + 20 * MB, 0.5)}
  comp = Compiler(budget)
  results, _ = screened_evaluate(plans, screened(plans, override=over), comp, budget, wave=2)
  r = next(r for r in results if r.plan == liar)
  assert liar in comp.compiled[:2]  # it looked like the winner: compiled first
  assert r.verdict == OVER_BUDGET and r.figures == "compiled" and r.memory_bytes > budget
  best = min((r for r in results if r.verdict == FEASIBLE), key=lambda r: (r.est_time_s, r.memory_bytes))
  assert best.plan == exhaustive_choice(plans, budget)  # the search went on to the true best


def test_nothing_fits_is_confirmed_by_compiling_the_smallest():
  plans = space()
  comp = Compiler(budget=1 * MB)
  results, _ = screened_evaluate(plans, screened(plans), comp, 1 * MB, wave=2)
  assert not any(r.verdict == FEASIBLE for r in results)
  assert comp.compiled  # XLA confirmed that even the smallest predicted plans are over
  smallest = min(plans, key=lambda p: truth(p)[0])
  assert smallest in comp.compiled
  assert all(r.verdict == OVER_BUDGET for r in results)


def test_an_exact_state_over_budget_is_never_compiled_for_its_variants():
  plans = space()
  budget = 9 * MB  # only FSDP plans' state (10 MiB / dp) can fit
  comp = Compiler(budget)
  results, _ = screened_evaluate(plans, screened(plans), comp, budget, wave=2)
  for r in results:
    if not r.plan.fsdp:
      assert r.plan not in comp.compiled and r.verdict == OVER_BUDGET
      assert r.reason.startswith("not compiled: parameters, optimizer state and batch alone need")
      assert r.reason.endswith("(exact)")
