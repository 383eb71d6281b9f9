"""The plan cache: hits skip the search, misses on any change, bad entries are replaced, writes are atomic."""
import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import optax
import pytest

import ap_xla
from ap_xla import plan_cache
from passes.evaluate import compile_plan
from passes.report import TIMEOUT, OutOfMemoryError
from passes.search import SearchSettings, search
from passes.space import SearchOptions
from tests.models import mlp_program

# One candidate (dp=8, replicated parameters, fp32): a real search that compiles once.
OPTS = SearchOptions(pipeline_parallel=False, mixed_precision=False, tensor_parallel=1, num_micro_batches=1,
                     distribute_parameter=False)
SETTINGS = SearchSettings(measure_budget_s=0, capacity_bytes=2**30, hardware="cpu", progress=False)


class Counting:
  """A compile_fn (or search_fn) that counts its calls."""

  def __init__(self, fn):
    self.fn, self.calls = fn, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def program():
  return mlp_program(batch=16).abstract()


@pytest.fixture(scope="module")
def searched(program):
  """A genuine SearchResult, for tests that only exercise the cache around it."""
  return search(program, options=OPTS, settings=SETTINGS)


def _run(program, tmp_path, search_fn=search, **kw):
  """A cached search with the real compile step (an injected compile_fn is never stored)."""
  counted = Counting(search_fn)
  t0 = time.perf_counter()
  res = plan_cache.cached_search(program, None, kw.pop("options", OPTS), kw.pop("settings", SETTINGS),
                                 directory=str(tmp_path), enabled=True, search_fn=counted, **kw)
  return res, counted.calls, time.perf_counter() - t0


def _key(program, options=OPTS, settings=SETTINGS, devices=None):
  devices = jax.devices() if devices is None else devices
  return plan_cache.fingerprint(plan_cache.key_document(program, devices, options, settings))


def test_second_search_is_served_from_the_cache(program, tmp_path, caplog):
  first, calls1, t1 = _run(program, tmp_path)
  assert calls1 == 1 and not first.from_cache
  assert os.listdir(tmp_path) == [os.path.basename(plan_cache.entry_path(str(tmp_path), _key(program)))]
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    second, calls2, t2 = _run(program, tmp_path)
  assert calls2 == 0 and second.from_cache
  assert second.plan == first.plan and second.candidates == first.candidates
  assert second.budget_bytes == first.budget_bytes and second.global_batch == first.global_batch
  assert "Reusing the cached plan" in caplog.text and "(search skipped)" in caplog.text
  assert t2 < t1


def test_any_change_that_matters_changes_the_key(program):
  base = _key(program)
  wider = mlp_program(batch=16, width=48).abstract()
  other_loss = dataclasses.replace(program, loss_fn=lambda p, b: jnp.mean(jnp.abs(
      program.loss_fn(p, b))))
  assert _key(wider) != base  # shapes
  assert _key(other_loss) != base  # same shapes, different computation
  assert _key(dataclasses.replace(program, optimizer=optax.sgd(0.1))) != base  # optimizer state
  assert _key(program, options=dataclasses.replace(OPTS, distribute_parameter=True)) != base
  assert _key(program, settings=dataclasses.replace(SETTINGS, memory_ratio=50.0)) != base
  assert _key(program, settings=dataclasses.replace(SETTINGS, measure_top_k=2)) != base  # measured choice
  assert _key(program, settings=dataclasses.replace(SETTINGS, hardware="h100", capacity_bytes=None)) != base
  assert _key(program, devices=jax.devices()[:4]) != base
  # what cannot change the result does not change the key
  assert _key(program, settings=dataclasses.replace(SETTINGS, max_threads=1, detailed_log=1)) == base
  assert _key(mlp_program(batch=16)) == base  # concrete arrays with the same shapes


def test_changed_option_misses_and_both_entries_stay(program, tmp_path):
  _run(program, tmp_path)
  other = dataclasses.replace(OPTS, distribute_parameter=True)
  res, calls, _ = _run(program, tmp_path, options=other)
  assert calls == 1 and not res.from_cache and res.plan.fsdp
  assert len(os.listdir(tmp_path)) == 2
  assert _run(program, tmp_path)[0].from_cache and _run(program, tmp_path, options=other)[0].from_cache


def _valid_entry(searched, key):
  return {"format": plan_cache.FORMAT, "version": plan_cache.version(), "key": key,
          "result": searched.to_json()}


BAD_ENTRIES = {
    "not json": (lambda s, k: "{ this is not json", "corrupt: not valid JSON"),
    "not ours": (lambda s, k: json.dumps({"hello": "world"}), "foreign: not an ap_xla plan cache entry"),
    "a list": (lambda s, k: json.dumps([1, 2, 3]), "foreign"),
    "missing fields": (lambda s, k: json.dumps({"format": plan_cache.FORMAT, "key": k}),
                       "corrupt: missing fields"),
    "other version": (lambda s, k: json.dumps(dict(_valid_entry(s, k), version="ap_xla.plan_cache/0 jax/0.1")),
                      "stale: written by"),
    "other key": (lambda s, k: json.dumps(_valid_entry(s, "0" * 64)), "foreign: it holds the plan for key"),
    "bad result": (lambda s, k: json.dumps(dict(_valid_entry(s, k), result={"plan": {"dp": 0}})),
                   "corrupt: it does not fit this search: its num_devices is None"),
    # valid JSON in the right format and key, with content no search of this request produced
    "memory not a number": (lambda s, k: _edited(s, k, lambda r: r["candidates"][0].update(memory_bytes="lots")),
                            "candidate 0's memory_bytes 'lots' is not a byte count"),
    "estimate not a number": (lambda s, k: _edited(s, k, lambda r: r["candidates"][0].update(est_time_s="fast")),
                              "candidate 0's est_time_s 'fast' is not a number of seconds"),
    "no candidates": (lambda s, k: _edited(s, k, lambda r: r.update(candidates=[])), "it holds no candidates"),
    "a plan for 64 devices": (lambda s, k: _edited(s, k, lambda r: r["plan"].update(dp=64)),
                              "the chosen plan Plan(dp=64, tp=1, pp=1, mb=1, recompute='none', fsdp=False) "
                              "uses 64 devices; this search is for 8"),
    "a plan the options exclude": (lambda s, k: _edited(s, k, lambda r: [c.update(fsdp=True) for c in (
        r["plan"], r["candidates"][0]["plan"])]),
                                   "does not honour the option distribute_parameter=False"),
    "another budget": (lambda s, k: _edited(s, k, lambda r: r.update(budget_bytes=1)),
                       "its budget_bytes is 1, this search's is"),
    "feasible over budget": (lambda s, k: _edited(s, k, lambda r: r["candidates"][0].update(memory_bytes=2**40)),
                             "candidate 0 is chosen with 1099511627776 bytes, over the budget"),
    "an out-of-memory entry with a fit": (lambda s, k: json.dumps(dict(
        {x: y for x, y in _valid_entry(s, k).items() if x != "result"},
        out_of_memory={"message": "OUT_OF_MEMORY", "candidates": s.to_json()["candidates"]})),
        "it says nothing fits, but candidate 0 is chosen"),
}


def _edited(searched, key, edit):
  entry = _valid_entry(searched, key)
  edit(entry["result"])
  return json.dumps(entry)


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_bad_entries_are_warned_about_and_replaced(case, program, searched, tmp_path, caplog):
  key = _key(program)
  path = plan_cache.entry_path(str(tmp_path), key)
  make, problem = BAD_ENTRIES[case]
  with open(path, "w") as f:
    f.write(make(searched, key))
  fake = Counting(lambda *a, **k: searched)
  with caplog.at_level(logging.WARNING, logger="ap_xla"):
    res, _, _ = _run(program, tmp_path, search_fn=fake)
  assert fake.calls == 1 and not res.from_cache
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(path in w and problem in w for w in warnings), warnings
  assert plan_cache.read_entry(path, key).plan == searched.plan  # replaced by a valid entry
  again, _, _ = _run(program, tmp_path, search_fn=fake)
  assert again.from_cache and fake.calls == 1


def test_an_entry_path_that_is_not_a_file_never_hangs(program, searched, tmp_path, caplog):
  """A FIFO at the entry's path: opened without blocking, warned about, replaced by a file."""
  import stat
  import threading
  key = _key(program)
  path = plan_cache.entry_path(str(tmp_path), key)
  os.mkfifo(path)
  out = {}
  fake = Counting(lambda *a, **k: searched)
  with caplog.at_level(logging.WARNING, logger="ap_xla"):
    t = threading.Thread(target=lambda: out.update(res=_run(program, tmp_path, search_fn=fake)[0]), daemon=True)
    t.start()
    t.join(30)
  assert not t.is_alive(), "reading a FIFO entry hung"
  assert fake.calls == 1 and not out["res"].from_cache
  assert f"Ignoring the plan cache entry {path}: not a regular file" in caplog.text
  assert stat.S_ISREG(os.stat(path).st_mode) and _run(program, tmp_path, search_fn=fake)[0].from_cache


def _partial_dump(obj, f, **kw):
  f.write('{"format": "ap_xla.plan_cache", "ver')
  raise OSError(28, "No space left on device")


def test_write_is_atomic(program, searched, tmp_path, monkeypatch, caplog):
  key = _key(program)
  path = plan_cache.entry_path(str(tmp_path), key)
  doc = plan_cache.key_document(program, jax.devices(), OPTS, SETTINGS)
  plan_cache.write_entry(path, key, doc, searched, program)
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
  before = open(path).read()
  monkeypatch.setattr(json, "dump", _partial_dump)
  other = dataclasses.replace(searched, global_batch=999)
  with pytest.raises(OSError, match="No space left"):
    plan_cache.write_entry(path, key, doc, other, program)
  assert open(path).read() == before and os.listdir(tmp_path) == [os.path.basename(path)]
  # a failed write after a search is a warning: the search's result still comes back
  stale = json.loads(before)
  stale["version"] = "old"
  with open(path, "w") as f:
    f.write(json.dumps(stale))
  stale_text = open(path).read()
  with caplog.at_level(logging.WARNING, logger="ap_xla"):
    res, _, _ = _run(program, tmp_path, search_fn=lambda *a, **k: other)
  assert res.global_batch == 999 and not res.from_cache
  assert "Could not write the plan cache entry" in caplog.text
  assert open(path).read() == stale_text and os.listdir(tmp_path) == [os.path.basename(path)]


def test_environment_variables(program, searched, tmp_path, monkeypatch):
  monkeypatch.delenv("AP_XLA_CACHE_DIR", raising=False)
  monkeypatch.setenv("MOREH_ADVANCED_PARALLELIZATION_CACHE_DIR", str(tmp_path / "moreh"))
  assert plan_cache.cache_dir() == str(tmp_path / "moreh")
  monkeypatch.setenv("AP_XLA_CACHE_DIR", str(tmp_path / "ours"))
  monkeypatch.delenv("MOREH_ADVANCED_PARALLELIZATION_CACHE_DIR")
  assert plan_cache.cache_dir() == str(tmp_path / "ours")
  assert plan_cache.cache_dir({}) == os.path.expanduser("~/.cache/ap_xla")
  monkeypatch.setenv("AP_XLA_PLAN_CACHE", "0")
  fake = Counting(lambda *a, **k: searched)
  for _ in range(2):
    res = plan_cache.cached_search(program, None, OPTS, SETTINGS, search_fn=fake)
    assert not res.from_cache
  assert fake.calls == 2 and not (tmp_path / "ours").exists()
  monkeypatch.setenv("AP_XLA_PLAN_CACHE", "maybe")
  with pytest.raises(ValueError, match="AP_XLA_PLAN_CACHE='maybe' is not valid"):
    plan_cache.cached_search(program, None, OPTS, SETTINGS, search_fn=fake)


def test_api_search_uses_the_cache(program, tmp_path, monkeypatch):
  monkeypatch.setenv("AP_XLA_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("AP_XLA_PLAN_CACHE", raising=False)
  kw = dict(dataclasses.asdict(OPTS), capacity_bytes=2**30, hardware="cpu", progress=False)
  first = ap_xla.search(program, **kw)
  second = ap_xla.search(program, **kw)
  assert not first.from_cache and second.from_cache and second.plan == first.plan


def test_entries_are_readable_by_others(program, tmp_path):
  res, _, _ = _run(program, tmp_path)
  (name,) = os.listdir(tmp_path)
  assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644)  # not mkstemp's 0600


def test_out_of_memory_outcome_is_cached_and_raised_again(program, searched, tmp_path, caplog):
  rejected = tuple(dataclasses.replace(c, verdict="over_budget", reason="over budget by 1 MiB")
                   for c in searched.candidates)

  def no_fit(*a, **k):
    raise OutOfMemoryError("OUT_OF_MEMORY: injected", rejected)
  fake = Counting(no_fit)
  for attempt in range(2):
    with caplog.at_level(logging.INFO, logger="ap_xla"), pytest.raises(OutOfMemoryError) as e:
      _run(program, tmp_path, search_fn=fake)
    assert str(e.value) == "OUT_OF_MEMORY: injected" and e.value.results == rejected
    assert getattr(e.value, "from_cache", False) == (attempt == 1)
  assert fake.calls == 1 and "no candidate fits (search skipped)" in caplog.text
  assert len(os.listdir(tmp_path)) == 1


def _with_timeout(searched):
  return dataclasses.replace(searched, candidates=searched.candidates[:1] + (dataclasses.replace(
      searched.candidates[0], verdict=TIMEOUT, reason="compile exceeded the 1 s limit"),))


@pytest.mark.parametrize("case", ["timeout", "timeout out of memory", "injected compile_fn", "cancelled"])
def test_outcomes_that_must_not_be_stored(case, program, searched, tmp_path, caplog):
  import threading
  cancel, kw = threading.Event(), {}
  if case == "timeout":
    fake = lambda *a, **k: _with_timeout(searched)
  elif case == "timeout out of memory":
    def fake(*a, **k):
      raise OutOfMemoryError("OUT_OF_MEMORY: injected", _with_timeout(searched).candidates[1:])
  elif case == "injected compile_fn":
    fake, kw = search, {"compile_fn": Counting(compile_plan)}
  else:
    def fake(*a, **k):
      cancel.set()  # the caller was interrupted while this search ran
      return searched
    kw = {"cancel": cancel}
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    for _ in range(2):  # searched both times: nothing was stored
      try:
        res, calls, _ = _run(program, tmp_path, search_fn=fake, **kw)
        assert not res.from_cache and calls == 1
      except OutOfMemoryError as e:
        assert not getattr(e, "from_cache", False)
  assert os.listdir(tmp_path) == []
  assert "Not storing this search in the plan cache" in caplog.text
