"""Measured re-ranking: real runs on the simulated devices, timings injected (nothing is timed).

The flat MLP keeps compiles short (a tiny Llama step compiles ~4x slower here).
"""
import dataclasses
import logging

import jax
import numpy as np
import pytest

from ap_xla import env
from passes import measure
from passes.plan import Plan
from passes.report import CHOSEN, COMPILE_ERROR, FEASIBLE, OVER_BUDGET, CandidateResult, OutOfMemoryError
from passes.search import SearchSettings, search
from passes.space import SearchOptions
from tests.models import mlp_program

OPTS = SearchOptions(pipeline_parallel=False, mixed_precision=False, tensor_parallel=1)
DEVICES = jax.devices()


class FakeTimer:
  """Runs each step for real (so a broken plan fails) and returns a scripted time."""

  def __init__(self, times, fail=()):
    self.times, self.fail, self.calls, self.losses = times, fail, [], []

  def __call__(self, plan, run_once):
    self.calls.append(plan)
    run_once()
    if plan in self.fail:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB.")
    return self.times[plan]


def _cand(plan, est, verdict=FEASIBLE):
  return CandidateResult(plan, verdict, memory_bytes=2**20, est_time_s=est)


A, B, C, D = Plan(dp=8), Plan(dp=8, fsdp=True), Plan(dp=4, tp=2), Plan(dp=2, mb=2)


def test_rerank_chooses_the_measured_fastest_and_records_failures(caplog):
  prog = mlp_program(batch=16)
  ranked = [_cand(A, 1e-3), _cand(B, 2e-3), _cand(C, 3e-3), _cand(D, 4e-3),
            _cand(Plan(dp=1), 5e-3, OVER_BUDGET)]
  timer = FakeTimer({A: 0.05, B: 0.03, C: 0.01}, fail={B})
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    out = measure.rerank(prog, ranked, DEVICES, k=3, timer=timer)
  # the k best estimates, in order, in 3 interleaved rounds (every other one reversed); B fails in
  # the first and leaves the later rounds; D is not run
  assert timer.calls == [A, B, C, C, A, A, C]
  assert [c.plan for c in out] == [C, A, D, Plan(dp=1), B]  # measured, unmeasured, rejected
  best = out[0]
  assert best.details["measured_s"] == 0.01 and best.details["est_over_measured"] == pytest.approx(0.3)
  assert best.reason.startswith("fastest measured of 2 run") and "est. 3.000 ms" in best.reason
  assert out[1].details["measured_s"] == 0.05 and "measured_s" not in out[2].details
  failed = out[4]
  assert failed.verdict == COMPILE_ERROR and failed.reason.startswith("failed at run time: RuntimeError")
  assert "RESOURCE_EXHAUSTED" in failed.details["measure_error"]
  text = caplog.text
  assert "estimated 3.000 ms, measured 10.000 ms" in text and "Chose Plan(dp=4, tp=2" in text
  assert "the estimate ranked it #2" in text
  # the caller's concrete parameters survive the donated steps
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(prog.params))


def test_search_with_measure_top_k_picks_the_measured_fastest(caplog):
  prog = mlp_program(batch=16).abstract()  # abstract params: random-initialized for the run
  base = search(prog, options=OPTS, settings=SearchSettings(capacity_bytes=2**40, progress=False, measure_budget_s=0))
  order = [c.plan for c in base.feasible]
  assert len(order) >= 2
  timer = FakeTimer({order[0]: 0.2, order[1]: 0.1})
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    res = search(prog, options=OPTS, timer=timer,
                 settings=SearchSettings(capacity_bytes=2**40, progress=False, measure_top_k=2))
  assert res.plan == order[1] and res.chosen.verdict == CHOSEN
  assert res.chosen.details["measured_s"] == 0.1 and "fastest measured" in res.chosen.reason
  assert res.candidates[1].plan == order[0] and res.candidates[1].details["measured_s"] == 0.2
  assert res.timings["measure"] > 0 and "The final configuration is" in caplog.text
  assert "fastest measured (100.000 ms) of 2 run" in caplog.text


def test_interleaved_rounds_take_each_candidates_median():
  """A load that hits one round (A's first run here) does not decide the choice: each candidate's
  time is the median of its rounds, its state allocated afresh for each."""
  prog = mlp_program(batch=16)
  script = {A: [0.5, 0.1, 0.1], B: [0.2, 0.2, 0.2]}
  calls = []

  def timer(plan, run_once):
    run_once()
    calls.append(plan)
    return script[plan][sum(p == plan for p in calls) - 1]
  out = measure.rerank(prog, [_cand(A, 1e-3), _cand(B, 2e-3)], DEVICES, k=2, timer=timer)
  assert calls == [A, B, B, A, A, B]
  assert [c.plan for c in out] == [A, B] and out[0].details["measured_s"] == 0.1
  assert out[0].details["measured_rounds_s"] == [0.5, 0.1, 0.1]
  one = measure.rerank(prog, [_cand(A, 1e-3), _cand(B, 2e-3)], DEVICES, k=2, rounds=1,
                       timer=lambda plan, run: {A: 0.5, B: 0.2}[plan])
  assert [c.plan for c in one] == [B, A]  # a single round: A's slow run decides
  with pytest.raises(ValueError, match=r"rounds must be a positive int .* got 0"):
    measure.rerank(prog, [_cand(A, 1e-3)], DEVICES, k=1, rounds=0)


def test_every_measured_candidate_failing_is_out_of_memory():
  prog = mlp_program(batch=16)
  timer = FakeTimer({}, fail={A})
  with pytest.raises(OutOfMemoryError, match=r"failed when run[\s\S]*RESOURCE_EXHAUSTED") as e:
    measure.rerank(prog, [_cand(A, 1e-3)], DEVICES, k=2, timer=timer)
  assert e.value.results[0].verdict == COMPILE_ERROR


def test_failures_fall_back_to_the_best_unmeasured_estimate():
  prog = mlp_program(batch=16)
  out = measure.rerank(prog, [_cand(A, 1e-3), _cand(B, 2e-3)], DEVICES, k=1,
                       timer=FakeTimer({}, fail={A}))
  assert [c.plan for c in out] == [B, A] and out[1].verdict == COMPILE_ERROR


def test_step_timer_takes_the_median_after_warmup(monkeypatch):
  ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # steps of 1, 3 and 2 seconds
  monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
  runs = []
  t = measure.StepTimer(warmup=2, steps=3)
  assert t(A, lambda: runs.append(1)) == 2.0 and len(runs) == 5
  with pytest.raises(ValueError, match=r"StepTimer.steps must be an int >= 1, got 0"):
    measure.StepTimer(steps=0)
  with pytest.raises(ValueError, match=r"StepTimer.max_steps must be an int >= 3, got 2"):
    measure.StepTimer(max_steps=2)
  with pytest.raises(ValueError, match=r"StepTimer.min_time_s must be a number of seconds >= 0, got -1"):
    measure.StepTimer(min_time_s=-1)
  with pytest.raises(ValueError, match=r"k must be a positive int .* got 0"):
    measure.rerank(mlp_program(), [], DEVICES, k=0)


def test_short_steps_are_timed_until_they_add_up_to_min_time(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

  def step(seconds):
    def run():
      clock[0] += seconds
    return run
  assert len(measure.StepTimer(min_time_s=0.5).samples(step(0.1))) == 5
  assert len(measure.StepTimer(min_time_s=0.5).samples(step(1.0))) == 3  # long steps: `steps` of them
  assert len(measure.StepTimer(min_time_s=0.5, max_steps=4).samples(step(0.01))) == 4
  t = measure.StepTimer()
  assert t.round_s(1.0) == pytest.approx(4.0) and t.round_s(0.01) == pytest.approx(0.51)
  assert t.round_s(1e-4) == pytest.approx(1e-4 + 50e-4)


def test_plan_runner_really_trains():
  prog = mlp_program(batch=16)
  with measure.PlanRunner(prog, C, DEVICES) as r:
    r.run_once()
    first = float(r.loss)
    for _ in range(3):
      r.run_once()
    assert np.isfinite(first) and float(r.loss) < first
  assert r.params is None


def test_abstract_inputs_are_made_in_place():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(DEVICES), ("data",))
  tree = {"tokens": jax.ShapeDtypeStruct((8, 4), jax.numpy.int32), "w": jax.ShapeDtypeStruct((8, 4), jax.numpy.float32)}
  out = measure._random_like(tree, {"tokens": NamedSharding(mesh, P("data")), "w": NamedSharding(mesh, P())}, 0)
  assert (np.asarray(out["tokens"]) == 0).all() and out["tokens"].sharding.spec == P("data")
  w = np.asarray(out["w"])
  assert w.dtype == np.float32 and 0 < w.std() < 0.1


@pytest.mark.parametrize("var", ["AP_XLA_MEASURE_TOP_K", "MOREH_ADVANCED_PARALLELIZATION_MEASURE_TOP_K"])
def test_measure_top_k_is_read_from_the_environment(var):
  assert env.read_settings({var: "3"}).measure_top_k == 3
  assert env.read_settings({}).measure_top_k == 0
  with pytest.raises(ValueError, match=var):
    env.read_settings({var: "-2"})


def test_measure_budget_is_read_from_the_environment():
  assert env.read_settings({}).measure_budget_s == 30.0
  assert env.read_settings({"AP_XLA_MEASURE_BUDGET": "0"}).measure_budget_s == 0.0
  assert env.read_settings({"MOREH_ADVANCED_PARALLELIZATION_MEASURE_BUDGET": "12.5"}).measure_budget_s == 12.5
  with pytest.raises(ValueError, match=r"AP_XLA_MEASURE_BUDGET='-1' is not valid: expected a number in \[0, 1e\+06\]"):
    env.read_settings({"AP_XLA_MEASURE_BUDGET": "-1"})
  with pytest.raises(ValueError, match=r"SearchSettings.measure_budget_s=inf is not valid"):
    SearchSettings(measure_budget_s=float("inf"))


def test_near_ties_are_measured_only_on_the_target_within_the_budget(caplog):
  from passes.hardware import get_profile
  cpu = get_profile("cpu")
  ranked = [_cand(A, 1.00e-3), _cand(B, 1.04e-3), _cand(C, 1.20e-3), _cand(D, 1.01e-3, OVER_BUDGET)]
  assert [c.plan for c in measure.near_ties(ranked)] == [A, B]  # C is 20% off; D does not fit
  # 2 x (1.6 x 0 s compile + 3 rounds x (1 warm-up step + 0.5 s of timed ~1 ms steps, at most 50))
  assert measure.predicted_measure_s(ranked[:2]) == pytest.approx(3 * 51 * 2.04e-3)
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    assert measure.auto_top_k(ranked, cpu, DEVICES, budget_s=30) == 2
  assert "2 feasible candidates are estimated within 5% of the best" in caplog.text
  assert "timing them on the devices (predicted 0 s, budget 30 s" in caplog.text
  caplog.clear()
  slow = [dataclasses.replace(c, compile_s=20.0) for c in ranked]  # 2 x 1.6 x 20 s > 30 s
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    assert measure.auto_top_k(slow, cpu, DEVICES, budget_s=30) == 0
    assert measure.auto_top_k(ranked, cpu, DEVICES, budget_s=0) == 0
  assert "predicted to take 64 s, over the 30 s budget" in caplog.text
  assert "automatic measuring is off (measure_budget_s=0)" in caplog.text
  assert caplog.text.count("AP_XLA_MEASURE_TOP_K=2") == 2
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    # a GPU target planned on these CPU devices: timing here would not be the target's
    assert measure.auto_top_k(ranked, get_profile("h100"), DEVICES, budget_s=30) == 0
    assert measure.auto_top_k([_cand(A, 1e-3), _cand(C, 2e-3)], cpu, DEVICES, budget_s=30) == 0
  assert "MEASURE_TOP_K" not in caplog.text and "timing them" not in caplog.text
  many = [_cand(Plan(dp=8 // t, tp=t, mb=m), 1e-3) for t in (1, 2, 4) for m in (1, 2)]
  assert measure.auto_top_k(many, cpu, DEVICES, budget_s=30) == measure.MAX_SUGGESTED


def test_near_ties_are_not_timed_by_one_of_many_processes(monkeypatch, caplog):
  """Each process would time them apart and could choose differently: the log says so."""
  from passes.hardware import get_profile
  monkeypatch.setattr(measure.jax, "process_count", lambda: 2)
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    assert measure.auto_top_k([_cand(A, 1e-3), _cand(B, 1e-3)], get_profile("cpu"), DEVICES, budget_s=30) == 0
  assert "the devices belong to 2 processes" in caplog.text and "AP_XLA_MEASURE_TOP_K=2" in caplog.text


def test_the_budget_stops_timing_and_keeps_only_complete_rounds(monkeypatch, caplog):
  prog = mlp_program(batch=16)
  clock = [0.0]
  monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

  def timer(plan, run_once):  # each run takes 4 s on the fake clock
    run_once()
    clock[0] += 4.0
    return {A: 0.3, B: 0.1}[plan]
  cands = [_cand(A, 1e-3), _cand(B, 2e-3)]
  # 10 s: A, B (round 0) and B (round 1) start before the deadline; B's second run is dropped
  out = measure.measure_interleaved(prog, cands, DEVICES, timer, rounds=3, deadline=10.0)
  assert out[A].details["measured_rounds_s"] == [0.3] and out[B].details["measured_rounds_s"] == [0.1]
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    ranked = measure.rerank(prog, cands, DEVICES, k=2, timer=timer, budget_s=3.0)  # only A runs
  assert [c.plan for c in ranked] == [A, B] and not any("measured_s" in c.details for c in ranked)
  assert "after 0 complete round(s) of 3" in caplog.text and "keeping the estimate's order" in caplog.text


def test_a_near_tie_failing_when_timed_by_the_search_itself_keeps_the_estimate(caplog):
  prog = mlp_program(batch=16)
  ranked = [_cand(A, 1e-3), _cand(B, 1.01e-3), _cand(C, 3e-3)]
  timer = FakeTimer({A: 0.3, B: 0.1}, fail={A})
  with caplog.at_level(logging.WARNING, logger="ap_xla"):
    out = measure.rerank(prog, ranked, DEVICES, k=2, timer=timer, budget_s=30, advisory=True)
  assert [c.plan for c in out] == [A, B, C] and all(c.verdict == FEASIBLE for c in out)
  assert "RESOURCE_EXHAUSTED" in out[0].details["measure_error"] and "measured_s" not in out[1].details
  assert "1 of the 2 timed near ties failed when run" in caplog.text and "keeping the estimate's order" in caplog.text
  # asked for (measure_top_k), the failure rejects the plan
  assert [c.plan for c in measure.rerank(prog, ranked, DEVICES, k=2, timer=FakeTimer({A: 0.3, B: 0.1}, fail={A}))] \
      == [B, C, A]


def test_the_search_times_its_near_ties_by_default(monkeypatch, caplog):
  prog = mlp_program(batch=16).abstract()
  settings = SearchSettings(capacity_bytes=2**40, progress=False)
  monkeypatch.setattr(measure, "NEAR_TIE", 0.5)  # this small space has no estimates within 5%
  base = search(prog, options=OPTS, settings=dataclasses.replace(settings, measure_budget_s=0))
  near = measure.near_ties([dataclasses.replace(c, verdict=FEASIBLE) if c.verdict == CHOSEN else c
                            for c in base.candidates])
  assert len(near) >= 2 and "measured_s" not in base.chosen.details
  timer = FakeTimer({c.plan: 0.1 * (len(near) - i) for i, c in enumerate(near)})  # the last is fastest
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    res = search(prog, options=OPTS, settings=settings, timer=timer)
  assert set(timer.calls) == {c.plan for c in near} and len(timer.calls) == 3 * len(near)
  assert res.plan == near[-1].plan and "fastest measured" in res.chosen.reason
  assert "timing them on the devices" in caplog.text and res.timings["measure"] > 0


