"""benchmarks/cost_replay.py: a plan_quality dump replayed gives the cost model's own estimates back.

A hand-made dump (no compile): two plans' HloStats in the form `plan_quality.py --dump` writes them.
"""
import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cost_replay as cr  # noqa: E402

from passes import cost_model  # noqa: E402
from passes.hardware import get_profile  # noqa: E402
from passes.hlo_stats import Collective, HloStats, Kernel  # noqa: E402
from passes.plan import Plan  # noqa: E402

A, B = Plan(dp=4, tp=2), Plan(dp=2, tp=4)
STATS = {
    A: HloStats(10**9, (Collective("all-reduce", 2**20, 2, 4, ((0, 1), (2, 3))),),
                kernels=(Kernel(10**9, 2**20, 1), Kernel(0, 8 * 2**20, 3))),
    B: HloStats(10**9, (Collective("all-reduce", 2**21, 4, 4, ((0, 1, 2, 3),)),),
                kernels=(Kernel(10**9, 2**20, 1), Kernel(0, 2**20, 3))),
}


def _row(plan, stats, times, confirm=()):
  """A row as plan_quality's `_dump` writes it."""
  return json.loads(json.dumps({
      "plan": plan.to_dict(), "chosen": False, "times": list(times), "confirm_times": list(confirm),
      "flops": stats.flops, "kernels": [list(k) for k in stats.kernels],
      "attention": [list(k) for k in stats.attention], "attention_causal": stats.attention_causal,
      "collectives": [[c.kind, c.bytes, c.group_size, c.count, [list(g) for g in c.groups]]
                      for c in stats.collectives]}))


def test_a_row_gives_back_its_stats_and_the_models_estimate():
  for plan, stats in STATS.items():
    back = cr.stats_of(_row(plan, stats, [0.1]))
    assert back == stats and back.kernels == stats.kernels and back.collectives[0].groups == stats.collectives[0].groups


def test_judge_scores_the_models_choice_on_the_confirmed_times():
  cpu = get_profile("cpu")
  est = {p: cost_model.estimate_step_time(s, p, cpu).total_s for p, s in STATS.items()}
  assert est[B] < est[A]  # B moves less: the model chooses it
  rows = [_row(A, STATS[A], [0.10, 0.12], confirm=[0.09]), _row(B, STATS[B], [0.20], confirm=[0.18])]
  j = cr.judge(rows, cpu)
  assert j["choice"] == repr(B) and j["basis"] == "confirmed"
  assert j["regret"] == pytest.approx(0.18 / 0.09) and j["spearman"] == pytest.approx(-1.0)
  assert j["est"] == [pytest.approx(est[A]), pytest.approx(est[B])]
  # not confirmed: judged on the rounds' medians
  j = cr.judge([_row(A, STATS[A], [0.10]), _row(B, STATS[B], [0.30])], cpu)
  assert j["basis"] == "rounds" and j["regret"] == pytest.approx(3.0)


def test_the_stream_curve_interpolates_in_log_size_and_charges_each_kernel_its_rate():
  curve = [(2**10, 10e9), (2**20, 20e9), (2**22, 5e9)]
  assert cr.curve_bandwidth(curve, 1) == 10e9 and cr.curve_bandwidth(curve, 2**30) == 5e9
  assert cr.curve_bandwidth(curve, 2**21) == pytest.approx(12.5e9)  # halfway in log size
  cpu = dataclasses.replace(get_profile("cpu"), memory_efficiency=1.0)
  flat = [(1, cpu.streaming_bandwidth), (2**40, cpu.streaming_bandwidth)]
  for plan, stats in STATS.items():  # one rate for every size: the model's own estimate
    assert cr.curve_estimate(stats, plan, cpu, flat) == pytest.approx(
        cost_model.estimate_step_time(stats, plan, cpu).total_s)
  fast = [(1, 100 * cpu.streaming_bandwidth), (2**40, 100 * cpu.streaming_bandwidth)]
  assert cr.curve_estimate(STATS[A], A, cpu, fast) < cr.curve_estimate(STATS[A], A, cpu, flat)
