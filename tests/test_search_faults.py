"""The search survives candidates that crash or hang, and an interrupt leaves nothing behind."""
import os
import signal
import threading
import time

import pytest

from ap_xla import env
from passes.evaluate import compile_plan
from passes.report import CHOSEN, COMPILE_ERROR, FEASIBLE, PRUNED, SKIPPED, TIMEOUT
from passes import search as search_mod
from passes.search import SearchSettings, search
from passes.space import SearchOptions
from tests.models import mlp_program

OPTS = SearchOptions(pipeline_parallel=False, mixed_precision=False, distribute_parameter=False)
# Every candidate compiled: the faults below hit candidates the screen might not send to XLA.
EXHAUSTIVE = dict(capacity_bytes=2**30, progress=False, exhaustive=True, measure_budget_s=0)
SLOW_S = 5.0  # how long an injected slow compile sleeps; the limit below is far shorter


@pytest.fixture(scope="module")
def program():
  return mlp_program()


@pytest.fixture(scope="module")
def real_compile():
  """compile_plan, memoized per plan so the fault-injected searches re-use the first one's work."""
  cache, lock = {}, threading.Lock()

  def compile_fn(program, plan, devices, dims):
    with lock:
      hit = cache.get(plan)
    if hit is None:
      hit = compile_plan(program, plan, devices, dims)
      with lock:
        cache[plan] = hit
    return hit
  return compile_fn


@pytest.fixture(scope="module")
def clean(program, real_compile):
  """The search without faults (its ranking tells which plan should win when others fail)."""
  return search(program, options=OPTS, settings=SearchSettings(**EXHAUSTIVE), compile_fn=real_compile)


def _faulty(real_compile, fail_tp, slow_tp, interrupt_tp=None):
  def compile_fn(program, plan, devices, dims):
    if plan.tp == fail_tp:
      raise RuntimeError(f"injected XLA crash for {plan}")
    if plan.tp == interrupt_tp:
      raise KeyboardInterrupt
    if plan.tp == slow_tp:
      time.sleep(SLOW_S)
    return real_compile(program, plan, devices, dims)
  return compile_fn


def test_crash_and_timeout_are_rejections_with_reasons_and_a_plan_is_still_chosen(
    program, real_compile, clean, monkeypatch):
  assert clean.plan.tp == 4  # the winner without faults; the faults below take it away
  monkeypatch.setenv("AP_XLA_COMPILE_TIMEOUT", "0.5")
  # Staged (the search without its screen, as when the screen cannot read a program): the
  # cheapest variant of each layout is compiled first, so one hung compile per layout is met,
  # and an exhaustive search would meet more hung siblings than it has workers.
  monkeypatch.setattr(search_mod, "_screen", lambda *a, **k: None)
  settings = env.read_settings(**dict(EXHAUSTIVE, exhaustive=False))
  assert settings.compile_timeout_s == 0.5
  t0 = time.perf_counter()
  res = search(program, options=OPTS, settings=settings,
               compile_fn=_faulty(real_compile, fail_tp=4, slow_tp=8))
  elapsed = time.perf_counter() - t0
  by_plan = {c.plan: c for c in res.candidates}

  crashed = [c for c in res.candidates if c.plan.tp == 4 and c.verdict not in (PRUNED, SKIPPED)]
  assert crashed and all(c.verdict == COMPILE_ERROR and "RuntimeError: injected XLA crash" in c.reason
                         for c in crashed)
  slow = [c for c in res.candidates if c.plan.tp == 8 and c.verdict not in (PRUNED, SKIPPED)]
  assert slow and all(c.verdict == TIMEOUT and c.reason == "compile exceeded the 0.5 s limit" for c in slow)
  assert all(0.5 < c.compile_s < SLOW_S for c in slow)
  # their memory-saving siblings are not compiled, and say why
  for c in res.candidates:
    if c.plan.tp in (4, 8) and c.verdict == PRUNED:
      assert "cheapest variant" in c.reason and ("compile_error" in c.reason or "timeout" in c.reason)
  # the search went on: the best plan among the others (by the fault-free ranking) wins
  expected = next(c.plan for c in clean.candidates
                  if c.verdict in (CHOSEN, FEASIBLE) and c.plan.tp not in (4, 8))
  assert res.plan == expected and res.chosen.verdict == CHOSEN
  assert by_plan[expected].est_time_s == next(c for c in clean.candidates if c.plan == expected).est_time_s
  # and did not wait for the hung compile
  assert elapsed < SLOW_S - 2, f"search took {elapsed:.1f} s; it waited for the slow candidate"


def _no_files_left(d):
  left = []
  for root, _, files in os.walk(d):
    left += [os.path.join(root, f) for f in files]
  return left


def test_keyboard_interrupt_in_a_compile_propagates_and_leaves_no_dump(program, real_compile, tmp_path):
  dump = tmp_path / "logs" / "autoconfig_log.dump"
  settings = SearchSettings(**EXHAUSTIVE, detailed_log=2, dump_path=str(dump), compile_timeout_s=30)
  t0 = time.perf_counter()
  with pytest.raises(KeyboardInterrupt):
    search(program, options=OPTS, settings=settings,
           compile_fn=_faulty(real_compile, fail_tp=None, slow_tp=8, interrupt_tp=2))
  assert time.perf_counter() - t0 < SLOW_S - 2  # not held up by the slow candidate
  assert _no_files_left(tmp_path) == []


def test_ctrl_c_signal_during_search_propagates_and_leaves_no_dump(program, real_compile, tmp_path):
  """A real SIGINT (what Ctrl-C sends) while every candidate is still compiling."""
  dump = tmp_path / "autoconfig_log.dump"
  settings = SearchSettings(measure_budget_s=0, capacity_bytes=2**30, progress=False, detailed_log=2, dump_path=str(dump))

  def all_slow(*args):
    time.sleep(SLOW_S)
    return real_compile(*args)
  # Python drops a KeyboardInterrupt raised inside a finalizer (a garbage collection that runs
  # while jax traces the screen: "Exception ignored in ..."), as a user's second Ctrl-C would
  # follow a lost first one, the signal comes again every half second until the search is left.
  left = threading.Event()

  def press():
    while not left.wait(0.5):
      os.kill(os.getpid(), signal.SIGINT)
  presser = threading.Thread(target=press, daemon=True)
  t0 = time.perf_counter()
  presser.start()
  try:
    with pytest.raises(KeyboardInterrupt):
      search(program, options=OPTS, settings=settings, compile_fn=all_slow)
  finally:
    left.set()
    presser.join()
  assert time.perf_counter() - t0 < SLOW_S - 2
  assert _no_files_left(tmp_path) == []


def test_interrupt_while_writing_the_plan_cache_leaves_no_partial_entry(program, real_compile, tmp_path,
                                                                        monkeypatch):
  import json
  from ap_xla import plan_cache
  from passes import search as search_mod
  # The cache stores only results of the real compile step; the memoized one stands for it here.
  monkeypatch.setattr(plan_cache, "compile_plan", real_compile)
  settings = SearchSettings(**EXHAUSTIVE)
  with pytest.raises(KeyboardInterrupt):  # during the search: nothing is written
    plan_cache.cached_search(program, options=OPTS, settings=settings, directory=str(tmp_path),
                             enabled=True, compile_fn=_faulty(real_compile, None, None, interrupt_tp=2))
  assert _no_files_left(tmp_path) == []

  def half_written(obj, f, **kwargs):  # Ctrl-C halfway through writing the entry
    f.write('{"format": "ap_xla.plan_cache", "result": {"pl')
    raise KeyboardInterrupt
  real_dump = json.dump
  monkeypatch.setattr(search_mod.json, "dump", half_written)
  with pytest.raises(KeyboardInterrupt):
    plan_cache.cached_search(program, options=OPTS, settings=settings, directory=str(tmp_path),
                             enabled=True, compile_fn=real_compile)
  monkeypatch.setattr(search_mod.json, "dump", real_dump)
  assert _no_files_left(tmp_path) == []
  # and the next search writes a whole entry that the one after it reads back
  first = plan_cache.cached_search(program, options=OPTS, settings=settings, directory=str(tmp_path),
                                   enabled=True, compile_fn=real_compile)
  again = plan_cache.cached_search(program, options=OPTS, settings=settings, directory=str(tmp_path),
                                   enabled=True, compile_fn=real_compile)
  assert not first.from_cache and again.from_cache and again.plan == first.plan


def test_a_bug_in_our_own_analysis_is_raised_not_recorded_as_a_compile_error(program, real_compile,
                                                                            monkeypatch):
  """Only compiling the user's program rejects a candidate; memory and HLO analysis are ours."""
  from passes import evaluate

  def broken(text):
    raise ZeroDivisionError("bug in the HLO analysis")
  monkeypatch.setattr(evaluate.hlo_stats, "analyze_hlo", broken)
  with pytest.raises(ZeroDivisionError, match="bug in the HLO analysis"):
    search(program, options=OPTS, settings=SearchSettings(measure_budget_s=0, capacity_bytes=2**30, progress=False),
           compile_fn=real_compile)
