"""The screen's calibration: corrections and stated errors per kind of plan (no XLA here)."""
import pytest

from passes.plan import Plan
from passes.screen_calibration import (MEMORY_FLOOR, PRIOR_MEMORY_ERROR, PRIOR_TIME_ERROR, SAFETY, Calibration,
                                       Sample, same_kind)

MB = 2**20


def sample(plan, ratio_mem=1.2, ratio_time=1.1, exact=10 * MB, var=40 * MB, t=1.0):
  return Sample(plan, exact, exact + var, exact + var * ratio_mem, t, t * ratio_time)


def test_nothing_compiled_states_the_priors():
  cal = Calibration.fit([])
  p = Plan(dp=8)
  assert cal.errors(p) == (PRIOR_MEMORY_ERROR, PRIOR_TIME_ERROR)
  assert cal.memory(p, 10 * MB, 50 * MB) == 50 * MB and cal.time(p, 2.0) == 2.0  # the raw screen
  lo, hi = cal.memory_bounds(p, 10 * MB, 50 * MB)
  assert lo == pytest.approx(10 * MB + 40 * MB * (1 - PRIOR_MEMORY_ERROR))  # the exact state has no error
  assert hi == pytest.approx(10 * MB + 40 * MB * (1 + PRIOR_MEMORY_ERROR))


def test_a_kind_measured_by_leaving_one_out_keeps_others_on_the_prior():
  flat = [sample(Plan(dp=8, mb=m), ratio_mem=r) for m, r in ((1, 1.20), (2, 1.22), (4, 1.18))]
  cal = Calibration.fit(flat)
  mem_err, time_err = cal.errors(Plan(dp=4, tp=2, mb=2))  # same kind: no pipeline, fp32, no recomputation
  # left out, each is predicted within 0.04 / 1.18 (x SAFETY: 4.2%), below what the raw screen
  # is known to miss: the kind states MEMORY_FLOOR
  assert SAFETY * 0.04 / 1.18 < MEMORY_FLOOR
  assert mem_err == pytest.approx(MEMORY_FLOOR) and time_err == pytest.approx(0.02)
  # corrected by the nearest of its kind: the screen's inexact part times that ratio
  assert cal.memory(Plan(dp=8, mb=2), 10 * MB, 50 * MB) == pytest.approx(10 * MB + 40 * MB * 1.22)
  piped = Plan(dp=4, pp=2, mb=4)
  assert cal.errors(piped) == (PRIOR_MEMORY_ERROR, PRIOR_TIME_ERROR)  # nothing of its kind compiled
  assert cal.memory(piped, 10 * MB, 50 * MB) == 50 * MB  # another kind's ratio is not applied
  full = Plan(dp=8, recompute="full")  # its memory is another kind; its time is not
  assert cal.errors(full)[0] == PRIOR_MEMORY_ERROR and cal.errors(full)[1] == time_err


def test_a_kind_whose_left_out_errors_exceed_the_floor_states_them():
  spread = [sample(Plan(dp=8, mb=m), ratio_mem=r) for m, r in ((1, 1.2), (2, 1.4), (4, 1.6))]
  cal = Calibration.fit(spread)
  # mb=1 predicted from mb=2 (its nearest): 1.4 for 1.2, the worst left-out error
  assert cal.errors(Plan(dp=8, mb=2))[0] == pytest.approx(SAFETY * 0.2 / 1.2)
  assert cal.errors(Plan(dp=8, mb=2))[0] > MEMORY_FLOOR


def test_a_badly_predicted_kind_does_not_widen_the_others():
  flat = [sample(Plan(dp=8, mb=m)) for m in (1, 2)]
  piped = [sample(Plan(dp=4, pp=2, mb=4), ratio_mem=0.5), sample(Plan(dp=4, pp=2, mb=8), ratio_mem=1.5)]
  cal = Calibration.fit(flat + piped)
  assert cal.errors(Plan(dp=8, mb=4))[0] == pytest.approx(MEMORY_FLOOR)  # its own: predicted exactly
  assert cal.errors(Plan(dp=2, pp=4, mb=8))[0] > 0.5
  assert cal.memory_error == max(cal.memory_errors.values())


def test_kinds():
  assert same_kind(Plan(dp=8), Plan(dp=2, tp=4, mb=8, fsdp=True), "memory")
  assert not same_kind(Plan(dp=8), Plan(dp=8, recompute="full"), "memory")
  assert same_kind(Plan(dp=8), Plan(dp=8, recompute="full"), "time")
  assert not same_kind(Plan(dp=8), Plan(dp=4, pp=2, mb=2), "time")
  assert not same_kind(Plan(dp=8), Plan(dp=8, bf16=True), "time")


def test_calibration_does_not_worsen_what_the_screen_had_right():
  """Two compiled candidates of one kind, the screen right on one (ratio 1.0) and 20% high on
  the other: each predicts the other worse than the raw screen did, so the kind keeps the raw
  screen (a plan like the first stays as screened) and states the raw screen's error."""
  right, high = sample(Plan(dp=8, mb=1), ratio_mem=1.0), sample(Plan(dp=8, mb=2), ratio_mem=0.8)
  cal = Calibration.fit([right, high])
  assert cal.memory(Plan(dp=8, mb=1), 10 * MB, 50 * MB) == 50 * MB
  assert cal.memory(Plan(dp=4, tp=2, mb=2), 10 * MB, 50 * MB) == 50 * MB
  assert cal.errors(Plan(dp=8))[0] == pytest.approx(SAFETY * 0.25)  # the raw screen: 40 for 32
  # consistent ratios still correct their kind (test_a_kind_measured_by_leaving_one_out...)
  assert ("memory", (None, False, "none")) in cal.raw_kinds


def test_a_schedules_correction_is_not_applied_to_another_schedule():
  """GPipe's and 1F1B's residuals differ (a stash of every tick, a ring): the screen's errors
  on them differ even in sign, so one's ratio is not the other's."""
  gpipe = [sample(Plan(dp=2, tp=2, pp=2, mb=m, recompute="full"), ratio_mem=0.8) for m in (2, 4)]
  cal = Calibration.fit(gpipe)
  one_f = Plan(dp=2, tp=2, pp=2, mb=4, recompute="full", schedule="1f1b")
  assert not same_kind(one_f, gpipe[0].plan, "memory")
  assert cal.memory(one_f, 10 * MB, 50 * MB) == 50 * MB
  assert cal.memory(Plan(dp=1, tp=4, pp=2, mb=2, recompute="full"), 10 * MB, 50 * MB) == pytest.approx(42 * MB)
