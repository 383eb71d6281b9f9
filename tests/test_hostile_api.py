"""The JAX-native API under hostile input: refused at once with what was passed named, never
a deep jax error, a wrong plan or a report headed with the wrong failure."""
import threading
import time

import jax
import numpy as np
import pytest

import ap_xla
from passes import search as search_pass
from passes.plan import Plan
from passes.report import TIMEOUT, CandidateResult, NothingCompiledError, OutOfMemoryError
from passes.search import SearchSettings
from passes.space import SearchOptions
from tests.models import mlp_program

OPTS = SearchOptions(pipeline_parallel=False, mixed_precision=False, tensor_parallel=1, num_micro_batches=1)
SETTINGS = SearchSettings(measure_budget_s=0, capacity_bytes=2**30, hardware="cpu", progress=False)


@pytest.fixture(scope="module")
def program():
  return mlp_program(batch=16).abstract()


def _never(*args, **kwargs):
  raise AssertionError("compiled: the input should have been refused first")


@pytest.mark.parametrize("devices, exc, match", [
    ("cpu", TypeError, r"devices must be a sequence of jax.Device, got the string 'cpu'; .*jax.devices\('cpu'\)"),
    (8, TypeError, "devices must be a sequence of jax.Device, got int 8"),
    ([], ValueError, "devices is empty"),
    (["cpu:0"], TypeError, "it holds str 'cpu:0'"),
    (lambda: [jax.devices()[0], jax.devices()[1], jax.devices()[0]], ValueError,
     r"lists the same device more than once \(.*\); .*pass distinct devices, e.g. jax.devices\(\)\[:2\]"),
])
def test_bad_devices_are_refused_naming_them(program, devices, exc, match):
  devices = devices() if callable(devices) else devices
  with pytest.raises(exc, match=match):
    search_pass.search(program, devices, OPTS, SETTINGS, compile_fn=_never)
  with pytest.raises(exc, match=match):
    ap_xla.search(program, devices, capacity_bytes=2**30)
  with pytest.raises(exc, match=match):
    ap_xla.Trainer(mlp_program(batch=16), Plan(dp=2), devices)


def test_measuring_a_simulated_target_is_refused_before_compiling(program):
  settings = SearchSettings(measure_budget_s=0, capacity_bytes=2**30, hardware="h100", progress=False, measure_top_k=2)
  match = "measure_top_k=2 .* on these cpu devices .* for the hardware profile 'h100'"
  with pytest.raises(ValueError, match=match):
    search_pass.search(program, None, OPTS, settings, compile_fn=_never)


def test_nothing_compiled_is_not_reported_as_out_of_memory(program):
  def broken(*args):
    raise RuntimeError("injected XLA crash")
  with pytest.raises(NothingCompiledError) as e:
    search_pass.search(program, None, OPTS, SETTINGS, compile_fn=broken)
  text = str(e.value)
  assert isinstance(e.value, OutOfMemoryError)  # callers that handle "no plan" handle it too
  assert text.startswith("NO_CANDIDATE_COMPILED: none of the 2 candidates tried compiled (0 timed out, 2 failed "
                         "to compile)") and "OUT_OF_MEMORY" not in text
  assert "RuntimeError: injected XLA crash" in text and "AP_XLA_DETAILED_LOG=1" in text


def test_a_batch_missing_a_key_names_it(program):
  trainer = ap_xla.Trainer(mlp_program(batch=16), Plan(dp=2), jax.devices()[:2])
  batch = {"x": np.ones((16, 32), np.float32), "y": np.zeros((16, 4), np.float32)}
  with pytest.raises(ValueError, match=r"the batch does not have the program's structure: missing \['y'\]; "
                                       r"unexpected \['labels'\]\. Pass a batch with the same keys"):
    trainer.step({"x": batch["x"], "labels": batch["y"]})
  with pytest.raises(ValueError, match=r"missing \['y'\]"):
    trainer.loss_and_grad({"x": batch["x"]})
  assert np.isfinite(float(trainer.step(batch)))  # the right batch still trains


def test_timed_out_compiles_are_retired_and_bounded():
  """Every compile times out: each abandoned worker ends with its compile instead of taking
  more work, and at most as many abandoned compiles run as workers (here 2 and 2)."""
  plans = [Plan(dp=8, mb=m) for m in (1, 2, 4, 8, 16, 32)]
  lock, running, peak, release = threading.Lock(), [0], [0], threading.Event()

  def slow(plan):
    with lock:
      running[0] += 1
      peak[0] = max(peak[0], running[0])
    release.wait(0.6)
    with lock:
      running[0] -= 1
    return CandidateResult(plan, "feasible", 1, 1.0)
  settings = SearchSettings(max_threads=2, compile_timeout_s=0.05, progress=False, measure_budget_s=0)
  t0 = time.perf_counter()
  results = search_pass._compile_all(plans, slow, settings)
  assert [r.verdict for r in results] == [TIMEOUT] * len(plans)
  assert peak[0] <= 2 * min(2, search_pass.compile_workers(settings))
  assert time.perf_counter() - t0 < 10
  release.set()
