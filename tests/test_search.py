"""The search end to end: fitting under a budget, out-of-memory, failing candidates, the dump."""
import json
import logging

import jax
import jax.numpy as jnp
import pytest

import ap_xla
from passes.evaluate import compile_plan
from passes.report import COMPILE_ERROR, OutOfMemoryError
from passes.search import SearchSettings, search
from passes.space import SearchOptions
from passes import memory
from tests.models import llama_tiny

# Two recomputation policies, not the auto space's four: the exhaustive test compiles every candidate.
OPTS = SearchOptions(pipeline_parallel=False, mixed_precision=False, tensor_parallel=1,
                     activation_recomputation=("none", "full"))


@pytest.fixture(scope="module")
def probe():
  """Per-device memory of the replicated and of the smallest dp=8 plans, with no budget."""
  prog = llama_tiny(batch=64)
  res = search(prog, options=OPTS, settings=SearchSettings(measure_budget_s=0, capacity_bytes=2**40, progress=False))
  return prog, res


def test_unconstrained_search_prefers_plain_data_parallel(probe):
  prog, res = probe
  assert res.plan.dp == 8 and not res.plan.fsdp
  assert res.chosen.verdict == "chosen" and res.chosen.memory_bytes > 0 and res.chosen.est_time_s > 0
  assert res.chosen.figures == "compiled"
  # the screen compiles the few that can win; the others are pruned with a reason, never dropped
  compiled = [c for c in res.candidates if c.compiled]
  predicted = [c for c in res.candidates if c.figures == "predicted"]
  assert len(compiled) < len(predicted) and len(compiled) + len(predicted) == len(res.candidates) - 1
  assert all(c.verdict == "pruned" and "cannot beat" in c.reason and c.est_time_s > 0 for c in predicted)


def test_the_screened_search_chooses_what_compiling_every_candidate_chooses(probe):
  prog, res = probe
  full = search(prog, options=OPTS, settings=SearchSettings(measure_budget_s=0, capacity_bytes=2**40, progress=False, exhaustive=True))
  assert all(c.compiled for c in full.candidates if c.verdict != "skipped")
  assert full.plan == res.plan
  assert sum(c.compiled for c in res.candidates) <= len(full.candidates) // 3
  # the screen's predictions of the candidates it did not compile, against XLA's figures
  compiled = {c.plan: c for c in full.candidates}
  for c in res.candidates:
    if c.figures == "predicted":
      assert 0.5 < c.est_time_s / compiled[c.plan].est_time_s < 2, c


def test_budget_forces_a_memory_saving_plan(probe, caplog):
  prog, res = probe
  replicated = next(c for c in res.candidates if c.plan == res.plan)
  budget = int(replicated.memory_bytes * 0.7)
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    res2 = search(prog, options=OPTS, settings=SearchSettings(measure_budget_s=0, capacity_bytes=budget, memory_ratio=100,
                                                              progress=False))
  assert res2.plan != res.plan
  assert res2.chosen.memory_bytes <= budget
  # the chosen plan's compiled memory really is under the budget
  compiled = compile_plan(prog.abstract(), res2.plan, jax.devices(), None)
  cpu = memory.memory_stats(compiled, "cpu")
  assert cpu.total <= budget and res2.chosen.memory_bytes == cpu.total  # the search charges the CPU dots' scratch
  assert res2.chosen.details["memory"]["scratch"] == cpu.scratch
  assert any(c.plan == res.plan and c.verdict == "over_budget" for c in res2.candidates)
  text = caplog.text
  order = ["parallelization candidates", "Start compilation", "Complete compilation",
           "number of possible candidates", "Start selecting", "Complete selecting", "final configuration"]
  positions = [text.index(s) for s in order]
  assert positions == sorted(positions)
  assert "num_stages : 1, num_micro_batches :" in text and "batch_per_device :" in text


def test_impossible_budget_raises_out_of_memory(probe):
  prog, _ = probe
  with pytest.raises(OutOfMemoryError) as e:
    search(prog, options=OPTS, settings=SearchSettings(measure_budget_s=0, capacity_bytes=64 * 1024, progress=False))
  msg = str(e.value)
  assert "OUT_OF_MEMORY" in msg and "smallest candidate" in msg and "more devices" in msg
  assert "un-pin tensor_parallel=1" in msg and "smaller global batch (now 64)" in msg
  # what the exact training state alone puts over the budget is not compiled
  assert any(r.verdict == "over_budget" and r.figures == "predicted" and "alone need" in r.reason
             and r.reason.startswith("not compiled:") for r in e.value.results)
  assert any(r.compiled for r in e.value.results)  # "nothing fits" rests on XLA's analysis too


def test_failing_candidate_is_recorded_and_skipped(probe, tmp_path):
  prog, _ = probe

  def flaky(program, plan, devices, dims):
    if not plan.fsdp:  # the screen's favourites: the search goes on to the next contenders
      raise RuntimeError("injected compiler crash")
    return compile_plan(program, plan, devices, dims)

  dump = tmp_path / "autoconfig_log.dump"
  res = search(prog, options=OPTS, compile_fn=flaky,
               settings=SearchSettings(measure_budget_s=0, capacity_bytes=2**40, progress=False, detailed_log=2,
                                       dump_path=str(dump)))
  assert res.plan.fsdp
  failed = [c for c in res.candidates if c.verdict == COMPILE_ERROR]
  assert failed and all("injected compiler crash" in c.reason for c in failed)
  doc = json.loads(dump.read_text())
  assert {c["verdict"] for c in doc["candidates"]} >= {"chosen", "compile_error"}


def test_parallelize_trains_with_the_chosen_plan():
  prog = llama_tiny(batch=16)
  trainer = ap_xla.parallelize(prog, pipeline_parallel=False, mixed_precision=False, tensor_parallel=1,
                               capacity_bytes=2**40, progress=False, num_micro_batches=1,
                               activation_recomputation=False)
  losses = [float(trainer.step(prog.batch)) for _ in range(5)]
  assert losses[-1] < losses[0]
  assert "Plan(dp=8" in repr(trainer.plan)
  with pytest.raises(ValueError, match="does not divide by data parallel x micro-batches"):
    trainer.step(jax.tree.map(lambda x: x[:4], prog.batch))


def test_only_a_pipelined_plan_fits_when_parameters_may_not_be_distributed():
  """Replicated weights exceed the capacity and distribute_parameter is pinned False."""
  from ap_xla.models.llama import LlamaConfig
  from tests.models import llama_tiny
  cfg = LlamaConfig(vocab=64, dim=64, layers=8, heads=4, ffn=256, seq=8)
  prog = llama_tiny(batch=32, cfg=cfg)
  opts = SearchOptions(distribute_parameter=False, mixed_precision=False, tensor_parallel=1,
                       num_micro_batches=4, activation_recomputation=False)
  free = search(prog, options=opts, settings=SearchSettings(measure_budget_s=0, capacity_bytes=2**40, progress=False))
  flat = min(c.memory_bytes for c in free.candidates if c.plan.pp == 1 and c.memory_bytes)
  piped = min(c.memory_bytes for c in free.candidates if c.plan.pp > 1 and c.memory_bytes)
  assert piped < flat
  budget = (flat + piped) // 2
  res = search(prog, options=opts, settings=SearchSettings(measure_budget_s=0, capacity_bytes=budget, memory_ratio=100,
                                                           progress=False))
  assert res.plan.pp > 1 and res.chosen.memory_bytes <= budget
  assert all(c.verdict == "over_budget" for c in res.candidates if c.plan.pp == 1)


def _tiny_flat_program(batch):
  """Shapes only: the searches below stop before compiling anything."""
  from passes.program import Program
  import optax
  return Program(params={"w": jax.ShapeDtypeStruct((4, 4), "float32")}, optimizer=optax.sgd(0.1),
                 batch={"x": jax.ShapeDtypeStruct((batch, 4), "float32")},
                 loss_fn=lambda p, b: (b["x"] @ p["w"]).mean())


def test_nothing_to_compile_is_a_value_error_listing_the_reasons(tmp_path):
  from passes.report import NoCandidateError
  dump = tmp_path / "autoconfig_log.dump"
  settings = SearchSettings(measure_budget_s=0, capacity_bytes=2**30, progress=False, detailed_log=2, dump_path=str(dump))
  with pytest.raises(NoCandidateError) as e:
    search(_tiny_flat_program(batch=3), options=SearchOptions(mixed_precision=False), settings=settings)
  assert isinstance(e.value, ValueError) and not isinstance(e.value, OutOfMemoryError)
  msg = str(e.value)
  assert msg.startswith("no parallelization candidate is left to compile for 8 devices and a global batch of 3")
  for dp in (8, 4, 2):
    assert f"batch 3 does not divide by data parallel {dp} (Plan(dp={dp}" in msg
  assert "no tensor-parallel group of the program divides by tp=8" in msg
  assert "a data-parallel size in [2, 4, 8] divides" in msg
  assert {r.verdict for r in e.value.results} == {"skipped"} and len(e.value.results) == 4
  assert {c["verdict"] for c in json.loads(dump.read_text())["candidates"]} == {"skipped"}


def test_pinned_tensor_parallel_no_group_can_use_is_a_value_error():
  with pytest.raises(ValueError, match=r"tensor_parallel=8 cannot be used by this program: no tensor-parallel "
                                       r"group of the program divides by tp=8; allowed: \[1\] or 'auto'"):
    ap_xla.search(_tiny_flat_program(batch=8), tensor_parallel=8, mixed_precision=False, progress=False)


def test_compile_workers_are_capped_at_the_cpus_the_process_may_use(monkeypatch):
  import os
  from passes.search import compile_workers
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
  assert compile_workers(SearchSettings(max_threads=16)) == 2  # MoAI's default on a 2-core host
  assert compile_workers(SearchSettings(max_threads=1)) == 1
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
  assert compile_workers(SearchSettings(max_threads=16)) == 16


def test_cpu_dot_scratch_is_charged_on_cpu_profiles_only():
  """ap-xla plan simulates an H100 on CPU devices: XLA:CPU's dot scratch is not the target's."""
  from passes.evaluate import Evaluator
  from passes.hardware import get_profile, is_host_profile
  from passes.plan import Plan
  grad = jax.jit(lambda x, g: x.T @ g).lower(jax.ShapeDtypeStruct((1024, 128), jnp.float32),
                                             jax.ShapeDtypeStruct((1024, 512), jnp.float32)).compile()
  scratch = memory.cpu_dot_scratch(grad.as_text())
  assert scratch > 0
  for hw, charged in ((get_profile("cpu"), scratch), (get_profile("cpu", name="calibrated-cpu-cpu-8"), scratch),
                      (get_profile("h100"), 0)):
    ev = Evaluator(None, tuple(jax.devices()), hw, 2**40, None, compile_fn=lambda *a: grad)
    r = ev(Plan())
    assert r.details["memory"]["scratch"] == charged, hw.name
    assert r.memory_bytes == memory.memory_stats(grad).total + charged
  assert not is_host_profile(get_profile("a100")) and is_host_profile(get_profile("cpu"))
