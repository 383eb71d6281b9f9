"""Which candidates the search compiles: families, waves and the branch-and-bound (no XLA here).

A fake compiler gives every plan a memory and a time that follow the rules the pruning relies
on (more recomputation or micro-batches: smaller and slower), so each test states which plans
must be compiled and which pruned, and why.
"""
import dataclasses
import itertools

from passes.plan import Plan
from passes.report import FEASIBLE, OVER_BUDGET, PRUNED, CandidateResult
from passes.staging import at_least, family, staged_evaluate

MB = 2**20


class FakeCompiler:
  """Memory = state + activations / (mb * recompute factor); time = base * recompute * (1 + mb/100)."""

  def __init__(self, budget, state, acts, base):
    self.budget, self.state, self.acts, self.base = budget, state, acts, base
    self.calls = []

  def __call__(self, plans):
    self.calls.append(list(plans))
    out = []
    for p in plans:
      shrink = {"none": 1, "dots": 2, "full": 4}[p.recompute] * (p.mb if p.pp == 1 else 1)
      mem = self.state[p.dp] + self.acts[p.dp] // shrink
      t = self.base[p.dp] * {"none": 1.0, "dots": 1.1, "full": 1.3}[p.recompute] * (1 + p.mb / 100)
      verdict = FEASIBLE if mem <= self.budget else OVER_BUDGET
      out.append(CandidateResult(p, verdict, memory_bytes=mem, est_time_s=t,
                                 details={"memory": {"argument": self.state[p.dp], "output": 0, "alias": 0}}))
    return out

  @property
  def compiled(self):
    return [p for wave in self.calls for p in wave]


def space(dps=(8, 4), mbs=(1, 2, 4, 8), recomputes=("none", "full")):
  return [Plan(dp=dp, tp=8 // dp, mb=mb, recompute=r) for dp, mb, r in itertools.product(dps, mbs, recomputes)]


def test_families_group_the_memory_saving_knobs():
  a, b = Plan(dp=8, mb=1), Plan(dp=8, mb=4, recompute="full")
  assert family(a) == family(b) and family(a) != family(Plan(dp=8, fsdp=True))
  assert family(Plan(dp=4, pp=2, mb=2)) != family(Plan(dp=4, pp=2, mb=4))  # pipelines: mb is a plan choice
  assert at_least(b, a) and not at_least(a, b)
  assert not at_least(Plan(dp=8, mb=4), Plan(dp=8, mb=1, recompute="full"))


def test_a_fitting_cheapest_variant_prunes_its_family():
  fake = FakeCompiler(budget=100 * MB, state={8: 10 * MB, 4: 10 * MB}, acts={8: 50 * MB, 4: 50 * MB},
                      base={8: 1.0, 4: 2.0})
  plans = space()
  out = staged_evaluate(plans, fake, 100 * MB)
  assert [r.plan for r in out] == plans  # one result per plan, in order
  assert fake.compiled == [Plan(dp=8, tp=1), Plan(dp=4, tp=2)]
  assert sum(r.verdict == PRUNED for r in out) == len(plans) - 2
  assert all("fits with less recomputation" in r.reason for r in out if r.verdict == PRUNED)


def test_waves_stop_at_the_first_fitting_variant_and_prune_what_saves_more():
  # dp=8 needs 4x less activation memory: mb=4 (none) or full recompute (mb=1) both fit.
  fake = FakeCompiler(budget=30 * MB, state={8: 10 * MB}, acts={8: 80 * MB}, base={8: 1.0})
  plans = space(dps=(8,))
  out = {r.plan: r for r in staged_evaluate(plans, fake, 30 * MB)}
  compiled = fake.compiled
  assert compiled == [Plan(dp=8), Plan(dp=8, mb=2), Plan(dp=8, mb=4),  # none: 1, 2, 4 (fits)
                      Plan(dp=8, recompute="full")]                      # full, mb=1 (fits)
  assert out[Plan(dp=8, mb=4)].verdict == FEASIBLE and out[Plan(dp=8, recompute="full")].verdict == FEASIBLE
  assert out[Plan(dp=8, mb=8)].verdict == PRUNED and "mb=4" in out[Plan(dp=8, mb=8)].reason
  assert out[Plan(dp=8, mb=8, recompute="full")].verdict == PRUNED


def test_branch_and_bound_skips_families_that_cannot_beat_the_best_feasible_plan():
  # dp=4 fits as it is at 2.0; dp=8 is over budget, its variants are at least 3.0: never compiled.
  fake = FakeCompiler(budget=30 * MB, state={8: 10 * MB, 4: 5 * MB}, acts={8: 80 * MB, 4: 20 * MB},
                      base={8: 3.0, 4: 2.0})
  plans = space()
  out = {r.plan: r for r in staged_evaluate(plans, fake, 30 * MB)}
  assert fake.compiled == [Plan(dp=8), Plan(dp=4, tp=2)]
  pruned = out[Plan(dp=8, mb=4)]
  assert pruned.verdict == PRUNED and pruned.reason.startswith("cannot beat Plan(dp=4, tp=2")
  assert "already estimates 3.030 s" in pruned.reason


def test_the_bound_tightens_as_waves_find_feasible_plans():
  # dp=8 (fast) fits at mb=2; dp=4 (slower) over budget: once dp=8 fits, dp=4's variants are
  # bounded by its own cheapest estimate (2.0 >= 1.02) and are not compiled.
  fake = FakeCompiler(budget=30 * MB, state={8: 10 * MB, 4: 10 * MB}, acts={8: 40 * MB, 4: 200 * MB},
                      base={8: 1.0, 4: 2.0})
  plans = space()
  out = {r.plan: r for r in staged_evaluate(plans, fake, 30 * MB)}
  assert fake.calls[0] == [Plan(dp=8), Plan(dp=4, tp=2)]
  assert fake.calls[1] == [Plan(dp=8, mb=2), Plan(dp=4, tp=2, mb=2)]  # the first wave has no feasible plan yet
  # dp=8 with full recomputation saves less on micro-batches than mb=2 does: not dominated, and
  # its bound (dp=8 none/mb=1, 1.01) is under the best (1.02), so it is tried; dp=4 never again.
  assert fake.calls[2:] == [[Plan(dp=8, recompute="full")]]
  assert out[Plan(dp=4, tp=2, mb=4)].verdict == PRUNED and "cannot beat Plan(dp=8" in out[Plan(dp=4, tp=2, mb=4)].reason


def test_state_over_budget_prunes_the_whole_family():
  fake = FakeCompiler(budget=30 * MB, state={8: 40 * MB}, acts={8: 8 * MB}, base={8: 1.0})
  out = staged_evaluate(space(dps=(8,)), fake, 30 * MB)
  assert fake.compiled == [Plan(dp=8)]
  assert all("alone, over the budget" in r.reason for r in out[1:])


def test_failed_cheapest_variant_prunes_with_its_verdict():
  def broken(plans):
    return [CandidateResult(p, "compile_error", reason="boom") for p in plans]
  out = staged_evaluate(space(dps=(8,)), broken, 30 * MB)
  assert out[0].verdict == "compile_error"
  assert all(r.verdict == PRUNED and "failed: compile_error" in r.reason for r in out[1:])


def test_pipelined_plans_keep_their_micro_batches():
  plans = [Plan(dp=4, pp=2, mb=m, recompute=r) for m in (2, 4) for r in ("none", "full")]
  fake = FakeCompiler(budget=10**12, state={4: 0}, acts={4: 0}, base={4: 1.0})
  out = staged_evaluate(plans, fake, 10**12)
  assert fake.compiled == [Plan(dp=4, pp=2, mb=2), Plan(dp=4, pp=2, mb=4)]
  assert [r.verdict for r in out] == [FEASIBLE, PRUNED, FEASIBLE, PRUNED]
  assert dataclasses.replace(out[1].plan, recompute="none") == out[0].plan
