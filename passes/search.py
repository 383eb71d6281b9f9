"""The sharding-search pass: enumerate -> screen -> compile what can win -> filter by memory ->
rank -> plan.

Each stage has one small function; `search` composes them in order and logs what each did,
in the order MoAI's Advanced Parallelization log shows. The screen (`passes.screen`) predicts
every candidate; `passes.selection` compiles only those it cannot rule out (every candidate
with `SearchSettings.exhaustive`; by `passes.staging`'s branch and bound when the screen
cannot analyse the program).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import queue
import sys
import threading
import tempfile
import time
from typing import Callable, Sequence

from passes import compile_threads, gpu_target
from passes import hardware as hw_lib
from passes.devices import check_devices
from passes.evaluate import Evaluator, compile_plan, derive_program_tp
from passes.plan import Plan
from passes.program import Program
from passes.report import (CHOSEN, FEASIBLE, SKIPPED, TIMEOUT, CandidateResult, fmt_bytes,
                           NoCandidateError, SearchResult, no_plan_error, rank)
from passes.selection import screened_evaluate
from passes.staging import staged_evaluate
from passes.space import SearchOptions, check_pinned_tp, enumerate_plans, no_candidate_message

log = logging.getLogger("ap_xla")



@dataclasses.dataclass(frozen=True)
class SearchSettings:
  """How the search runs (the environment variables' values, resolved).

  Attributes:
    memory_ratio: percent of device memory a plan may use (MoAI's correction ratio, default 80).
    max_threads: at most this many candidates compiled at once; never more than the CPUs this
      process may use (`compile_workers`).
    detailed_log: 0 summary, 1 per-candidate lines, 2 also writes `dump_path`.
    dump_path: where detailed_log=2 writes the JSON report.
    capacity_bytes: per-device memory; None: the device's own figure, else the profile's.
    hardware: a profile name or HardwareProfile; None: detected from the devices.
    compile_timeout_s: per-candidate compile time limit (None: no limit).
    progress: show a progress bar (None: when stderr is a terminal).
    measure_top_k: run the k best-estimated feasible candidates on the devices and choose the
      measured-fastest (0: only the near ties `measure_budget_s` allows).
    measure_budget_s: with measure_top_k=0, when the best estimates lie within 5% of each other
      (closer than the estimate orders plans) and the devices are the plan's target, the search
      times those near ties (at most 4) on the devices and chooses the fastest if that is
      predicted to take at most this many seconds, and starts no timed run after them
      (`passes.measure.auto_top_k`); 0: choose by the estimate alone (as MoAI does).
    exhaustive: compile every candidate instead of only those the analytic screen cannot rule
      out (`passes.selection`): minutes instead of seconds, for checking the screen.
  """
  memory_ratio: float = 80.0
  max_threads: int = 16
  detailed_log: int = 0
  dump_path: str = "autoconfig_log.dump"
  capacity_bytes: int | None = None
  hardware: object = None
  compile_timeout_s: float | None = None
  progress: bool | None = None
  measure_top_k: int = 0
  measure_budget_s: float = 30.0
  exhaustive: bool = False

  def __post_init__(self):
    # The same ranges as the environment reader (ap_xla/env.py), for values passed in code.
    def bad(name, allowed, fix=""):
      return ValueError(f"SearchSettings.{name}={getattr(self, name)!r} is not valid: expected {allowed}."
                        + (f" {fix}" if fix else ""))
    def is_int(v):
      return isinstance(v, int) and not isinstance(v, bool)
    def is_num(v):
      return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    if not is_num(self.memory_ratio) or not 0 < self.memory_ratio <= 100:
      raise bad("memory_ratio", "a number in (0, 100] (percent of device memory)", "The default is 80.")
    if not is_int(self.max_threads) or self.max_threads < 1:
      raise bad("max_threads", "an integer >= 1")
    if not is_int(self.detailed_log) or self.detailed_log not in (0, 1, 2):
      raise bad("detailed_log", "0 (summary), 1 (per-candidate lines) or 2 (also write dump_path)")
    if not isinstance(self.dump_path, str) or not self.dump_path:
      raise bad("dump_path", "a non-empty file path")
    if self.capacity_bytes is not None and (not is_int(self.capacity_bytes) or self.capacity_bytes <= 0):
      raise bad("capacity_bytes", "a positive int (bytes per device) or None",
                "For a size such as '256MiB' use passes.hardware.parse_bytes.")
    if self.compile_timeout_s is not None and (not is_num(self.compile_timeout_s) or self.compile_timeout_s <= 0):
      raise bad("compile_timeout_s", "a positive number of seconds or None (no limit)")
    if self.progress is not None and not isinstance(self.progress, bool):
      raise bad("progress", "True, False or None (when stderr is a terminal)")
    if not is_int(self.measure_top_k) or self.measure_top_k < 0:
      raise bad("measure_top_k", "an integer >= 0 (0: only the near ties measure_budget_s allows)")
    if not is_num(self.measure_budget_s) or not 0 <= self.measure_budget_s < float("inf"):
      raise bad("measure_budget_s", "a number of seconds >= 0 (0: choose by the estimate alone)")
    if not isinstance(self.exhaustive, bool):
      raise bad("exhaustive", "True or False")
    hw = self.hardware
    if isinstance(hw, str):
      if hw.strip().lower() not in hw_lib.PROFILE_NAMES:
        raise bad("hardware", f"None (detect), a HardwareProfile or one of {list(hw_lib.PROFILE_NAMES)}",
                  "For a JSON profile use passes.hardware.load_profile.")
    elif hw is not None and not isinstance(hw, hw_lib.HardwareProfile):
      raise TypeError(f"SearchSettings.hardware must be None (detect), a profile name or a HardwareProfile, "
                      f"got {hw!r} ({type(hw).__name__}).")


def resolve_hardware(settings: SearchSettings, devices) -> tuple[hw_lib.HardwareProfile, int]:
  """The hardware profile and the per-device capacity the budget is taken from."""
  hw = settings.hardware
  if hw is None:
    hw = hw_lib.detect_profile(devices)
  elif isinstance(hw, str):
    hw = hw_lib.get_profile(hw)
  capacity = settings.capacity_bytes or hw_lib.device_memory_bytes(devices[0]) or hw.memory_bytes
  return hw, int(capacity)


def compile_workers(settings: SearchSettings) -> int:
  """How many candidates compile at once: `max_threads`, capped at the CPUs this process may use.

  One XLA compile already keeps more than one core busy; threads beyond the cores only share
  them and add memory (a search of the plan_quality model took 20-25% longer with 16 threads
  than with 2 on 2 cores).
  """
  try:
    cpus = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not on Linux
    cpus = os.cpu_count() or 1
  return max(1, min(settings.max_threads, cpus))


class _Worker:
  """One compile thread's state: the plan it compiles and since when; retired once abandoned."""

  def __init__(self):
    self.plan: Plan | None = None
    self.t0 = 0.0
    self.retired = False
    self.thread: threading.Thread | None = None


def _compile_all(plans: Sequence[Plan], evaluate: Callable, settings: SearchSettings) -> list[CandidateResult]:
  """Evaluates plans on worker threads; one past the time limit is recorded as a timeout.

  A compile cannot be cancelled: a timed-out one is abandoned on its thread, which is retired
  (it ends when its compile does) and replaced, so the others keep their pace. At most as
  many abandoned compiles run as there are workers, so memory stays bounded; past that a
  replacement waits for one of them to end. The threads are started by `compile_threads`,
  which keeps the process from aborting when it exits while some still compile.
  """
  if not plans:
    return []
  show = settings.progress if settings.progress is not None else sys.stderr.isatty()
  bar = None
  if show:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(plans), desc="compiling candidates", unit="cand", leave=False)
  todo: queue.Queue = queue.Queue()
  for p in plans:
    todo.put(p)
  done: queue.Queue = queue.Queue()
  stop = threading.Event()

  def work(me: _Worker):
    while not (stop.is_set() or me.retired or compile_threads.closing()):
      try:
        p = todo.get_nowait()
      except queue.Empty:
        return
      me.t0 = time.perf_counter()  # before the plan: the main thread reads the plan first
      me.plan = p
      try:
        r = evaluate(p)
      except BaseException as e:  # handed to the main thread, which re-raises it
        r = e
      done.put((p, r))
      me.plan = None

  def spawn() -> _Worker:
    me = _Worker()
    me.thread = compile_threads.start(lambda: work(me), "ap_xla_compile")
    return me

  n = min(compile_workers(settings), len(plans))
  active, abandoned = [spawn() for _ in range(n)], []
  results: dict[Plan, CandidateResult] = {}
  limit = settings.compile_timeout_s
  try:
    while len(results) < len(plans):
      try:
        p, r = done.get(timeout=0.1)
        if p not in results:  # a timed-out plan may still report later: its verdict stands
          if isinstance(r, BaseException):
            raise r
          results[p] = r
          if bar is not None:
            bar.update(1)
      except queue.Empty:
        pass
      if limit is not None:
        now = time.perf_counter()
        for w in list(active):
          p = w.plan
          if p is not None and p not in results and now - w.t0 > limit:
            results[p] = CandidateResult(p, TIMEOUT, reason=f"compile exceeded the {limit:g} s limit",
                                         compile_s=now - w.t0)
            w.retired = True
            active.remove(w)
            abandoned.append(w)
            if bar is not None:
              bar.update(1)
      abandoned = [w for w in abandoned if w.thread.is_alive()]
      while len(active) < n and len(active) + len(abandoned) < 2 * n and not todo.empty():
        active.append(spawn())
      if compile_threads.closing():
        raise RuntimeError("the process is exiting: the search was abandoned")
  finally:
    stop.set()
    if bar is not None:
      bar.close()
  return [results[p] for p in plans]


def config_line(plan: Plan, global_batch: int) -> str:
  """The chosen configuration, in the words of MoAI's log."""
  return (f"num_stages : {plan.pp}, num_micro_batches : {plan.mb}, batch_per_device : "
          f"{plan.batch_per_device(global_batch)}, DP : {plan.dp}, TP : {plan.tp}, recomputation : "
          f"{plan.recompute.upper()}, distribute_param : {str(plan.fsdp).lower()}, "
          f"distribute_low_prec_param : {str(plan.low_prec).lower()}, mixed_precision : "
          f"{str(plan.bf16).lower()}" + (f", fsdp_group : {plan.fsdp_group} (HSDP: {plan.replicas} replicas)"
                                         if plan.hsdp else ""))


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temporary file beside `path` and renames it over: never half-written."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def fsdp_groups(program: Program, hw, options: SearchOptions) -> Callable:
  """`(dp, tp) -> HSDP group sizes` the search tries beside FSDP over all of dp
  (`passes.space.hsdp_groups` on `hw`'s nodes; none where FSDP is turned off)."""
  if options.distribute_parameter is False:
    return lambda dp, tp: ()
  from passes.shardings import largest_shard_group
  from passes.space import hsdp_groups
  return hsdp_groups(hw.devices_per_node, functools.cache(lambda dp: largest_shard_group(program, dp)))


def search(program: Program, devices=None, options: SearchOptions | None = None,
           settings: SearchSettings | None = None, *, compile_fn: Callable = compile_plan,
           timer: Callable | None = None) -> SearchResult:
  """Searches the plans of `program` on `devices` and returns the ranked report.

  Args:
    program: the training program (arrays or ShapeDtypeStructs; nothing is allocated).
    devices: the devices to plan for (default: all of `jax.devices()`).
    options: the search knobs (default: everything 'auto').
    settings: how the search runs (memory ratio, threads, log detail, capacity, hardware).
    compile_fn: replaces the compile step (tests inject failures with it).
    timer: where candidates are timed (`settings.measure_top_k`, `measure_budget_s`),
      `timer(plan, run_once) -> seconds` replaces the step timer (see `passes.measure.rerank`).

  Returns:
    A `SearchResult`: the chosen plan and every candidate with memory, estimate and verdict.

  Raises:
    OutOfMemoryError: no candidate fits; the message says by how much and what would help
      (a `NothingCompiledError` when no candidate compiled at all: each timed out or failed).
    ValueError: an option can never be satisfied for this program and device count; a
      `NoCandidateError` (a ValueError) when the options leave no candidate to compile (its
      message lists the distinct reasons).
  """
  t_start = time.perf_counter()
  options = options or SearchOptions()
  settings = settings or SearchSettings()
  devices = check_devices(devices)
  abstract = program.abstract()
  hw, capacity = resolve_hardware(settings, devices)
  budget = int(capacity * settings.memory_ratio / 100)
  batch = abstract.batch_size
  if settings.measure_top_k:
    from passes import measure
    measure.check_measurable(hw, devices, settings.measure_top_k)  # before minutes of compiling

  tp_rules = None
  if options.tensor_parallel != 1 and len(devices) > 1:
    tp_rules = derive_program_tp(abstract)
    log.debug("tensor-parallel rules: %s", tp_rules)

  def tp_ok(tp):
    if tp_rules is None or not tp_rules.shardable(tp):
      return f"no tensor-parallel group of the program divides by tp={tp}"
    return None

  def pipeline_ok(pp, mb, dp):
    from passes import pipeline
    return pipeline.check_pipeline(abstract.num_blocks, batch, pp, mb, dp)

  plans, skipped = enumerate_plans(len(devices), batch, abstract.num_blocks, options, tp_ok, pipeline_ok,
                                   fsdp_groups(abstract, hw, options))
  check_pinned_tp(len(devices), options, tp_ok)
  log.info("Generated %d parallelization candidates (%d left out) for %r on %d devices (%s, "
           "budget %s per device).", len(plans), len(skipped), abstract, len(devices), hw.name,
           fmt_bytes(budget))
  for s in skipped:
    log.debug("left out %s: %s", s.plan, s.reason)
  if not plans:  # bad input, not a memory shortage: say why each candidate was left out
    left_out = [CandidateResult(s.plan, SKIPPED, reason=s.reason) for s in skipped]
    _dump(settings, left_out, None, budget, capacity, hw, devices, batch, t_start)
    raise NoCandidateError(no_candidate_message(len(devices), batch, skipped, options.pinned()), left_out)
  route = _route(hw, devices)
  evaluate = Evaluator(abstract, route.devices, hw, budget, tp_rules, compile_fn, route=route.name)
  compile_all = lambda ps: _compile_all(ps, evaluate, settings)
  workers = compile_workers(settings)
  screened, t_screen = None, 0.0
  if not settings.exhaustive:
    t0 = time.perf_counter()
    with gpu_target.tracing_for(route):  # the screen reads the program the target runs
      screened = _screen(abstract, route.devices, tp_rules, plans, hw)
    t_screen = time.perf_counter() - t0
    if screened is not None:
      log.info("Screened %d candidates in %.2f s: compiling only those that can win.", len(plans), t_screen)
  log.info("Start compilation of the candidates (up to %d at once).", workers)
  t0 = time.perf_counter()
  calibration = None
  if screened is not None:
    results, calibration = screened_evaluate(plans, screened, compile_all, budget, workers)
  elif settings.exhaustive:
    results = compile_all(plans)
  else:
    results = staged_evaluate(plans, compile_all, budget)
  t_compile = time.perf_counter() - t0
  compiled = sum(r.compiled for r in results)
  predicted = len(results) - compiled
  log.info("Complete compilation of %d candidates (predicted %d, compiled %d). Elapsed time: %.2f s",
           len(results), predicted, compiled, t_compile)
  if calibration is not None:
    log.info("The screen's largest stated error after %d compiled candidates: memory %.1f%%, time %.1f%%.",
             len(calibration.samples), 100 * calibration.memory_error, 100 * calibration.time_error)
  results += [CandidateResult(s.plan, SKIPPED, reason=s.reason) for s in skipped]

  ok = [r for r in results if r.verdict == FEASIBLE]
  log.info("The number of possible candidates is %d.", len(ok))
  log.info("Start selecting the best candidate.")
  t1 = time.perf_counter()
  ranked = rank(results)
  if settings.detailed_log >= 1:
    for r in ranked:
      log.info("  candidate %s: memory %s, est. %s, %s %s", r.plan,
               f"{r.memory_bytes / 2**20:.1f} MiB" if r.memory_bytes else "-",
               f"{r.est_time_s * 1e3:.3f} ms" if r.est_time_s else "-", r.verdict, r.reason)
  if not ok:
    _dump(settings, ranked, None, budget, capacity, hw, devices, batch, t_start)
    raise no_plan_error(ranked, budget, capacity, settings.memory_ratio, len(devices), batch, options.pinned())
  t_measure = 0.0
  from passes import measure  # runs candidates on the devices when asked, or for affordable near ties
  k, budget_s = settings.measure_top_k, None
  if not k:
    k, budget_s = measure.auto_top_k(ranked, hw, devices, settings.measure_budget_s), settings.measure_budget_s
  if k:
    t2 = time.perf_counter()
    ranked = measure.rerank(program, ranked, devices, k, timer=timer, budget_s=budget_s,
                            advisory=budget_s is not None)
    t_measure = time.perf_counter() - t2
  chosen = dataclasses.replace(ranked[0], verdict=CHOSEN, reason=ranked[0].reason if "measured_s" in
                               ranked[0].details else f"fastest estimate among {len(ok)} feasible candidates")
  ranked[0] = chosen
  t_select = time.perf_counter() - t1
  log.info("Complete selecting the best candidate. Elapsed time: %.3f s", t_select)
  log.info("The final configuration is: %s", config_line(chosen.plan, batch))
  screen_doc = {} if calibration is None else {
      "predicted": predicted, "compiled": compiled, "samples": len(calibration.samples),
      "memory_error": calibration.memory_error, "time_error": calibration.time_error}
  result = SearchResult(chosen.plan, tuple(ranked), budget, capacity, hw.name, len(devices), batch,
                        {"screen": t_screen, "compile": t_compile, "select": t_select, "measure": t_measure,
                         "total": time.perf_counter() - t_start}, screen=screen_doc, route=route.describe())
  _dump(settings, ranked, result, budget, capacity, hw, devices, batch, t_start)
  return result


def _route(hw: hw_lib.HardwareProfile, devices) -> gpu_target.CompileRoute:
  """Where the candidates compile (`passes.gpu_target`), logged; a GPU profile that falls back
  to the CPU devices says why."""
  route = gpu_target.compile_route(hw, devices)
  if route.note:
    log.warning("Compiling the candidates for %s on CPU devices (XLA:CPU), not for the GPU: %s. Memory and "
                "time are then XLA:CPU's program's, not XLA:GPU's.", hw.name, route.note)
  else:
    log.info("Compiling the candidates with %s.", route.describe())
  return route


def _screen(program: Program, devices, tp_rules, plans, hw) -> dict | None:
  """Every plan's screened figures, or None (with a warning) when the screen cannot analyse
  the program: the search then compiles by the branch-and-bound of `passes.staging`."""
  from passes import screen
  try:
    s = screen.build_screen(program, devices, tp_rules, plans)
    return {p: s(p, hw) for p in plans}
  except Exception as e:  # the screen is an optimisation: a program it cannot read is still searched
    log.warning("The analytic screen cannot analyse %r (%s: %s); compiling candidates by branch and "
                "bound instead.", program, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
    log.debug("screen failure", exc_info=True)
    return None


def _dump(settings, ranked, result, budget, capacity, hw, devices, batch, t_start):
  if settings.detailed_log < 2:
    return
  doc = result.to_json() if result is not None else {
      "plan": None, "candidates": [r.to_json() for r in ranked], "budget_bytes": budget,
      "capacity_bytes": capacity, "hardware": hw.name, "num_devices": len(devices),
      "global_batch": batch, "timings": {"total": time.perf_counter() - t_start}}
  write_json_atomic(settings.dump_path, doc)
  log.info("Wrote the detailed candidate log to %s", settings.dump_path)
