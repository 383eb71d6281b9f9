"""Measured re-ranking: run the best-estimated candidates for a few steps and keep the fastest.

The cost model ranks every candidate; `rerank` then builds the k best-estimated feasible ones
on the real devices (parameters and optimizer state allocated for each, sharded as the plan
says), times a few steps after warm-up, and puts the measured-fastest first. A candidate that
fails when run (out of memory, a runtime error) is recorded with the reason and not chosen.

The candidates are timed in `rounds` interleaved rounds (every other one in reverse order),
each round allocating a candidate's state afresh and timing a few steps, so a load that
drifts while they run (a shared host, a throttling device) hits every candidate alike; a
candidate's time is the median of its rounds. One candidate's state is alive at a time: the
finalists are each near the memory budget and cannot share a device.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from passes.build import build_plan
from passes.plan import Plan
from passes.program import Program, is_abstract
from passes.report import (COMPILE_ERROR, FEASIBLE, CandidateResult, OutOfMemoryError, fmt_time, rank)
from passes.step import BuiltStep

log = logging.getLogger("ap_xla")
PyTree = Any

# `timer(plan, run_once) -> seconds`: the step time of a plan, given a function that runs one
# step to completion. Tests inject one to pick the winner without timing anything.
Timer = Callable[[Plan, Callable[[], None]], float]


def check_measurable(hardware, devices, k: int) -> None:
  """Raises ValueError when measuring `k` candidates on `devices` would not time the target.

  A GPU profile used on CPU devices plans for a simulated target (`ap-xla plan --hardware h100`);
  timing the candidates there would re-rank the target's plans by the CPU's speed. Likewise
  a built-in GPU profile on devices of another GPU kind.
  """
  from passes import hardware as hw_lib
  if not k:
    return
  platform, kind = devices[0].platform, devices[0].device_kind
  if platform == "cpu":
    simulated = not hw_lib.is_host_profile(hardware)
  else:
    simulated = hardware.name in hw_lib.PROFILE_NAMES and hw_lib.detect_profile(devices).name != hardware.name
  if simulated:
    raise ValueError(f"measure_top_k={k} (AP_XLA_MEASURE_TOP_K) would time the candidates on these {platform} "
                     f"devices ({kind}), but the plan is for the hardware profile {hardware.name!r}: the "
                     "timings would not be the target's. Measure on the target devices, or set "
                     "measure_top_k=0 (AP_XLA_MEASURE_TOP_K unset) to rank by the estimate.")


# The estimate does not order plans whose estimated step times lie within this share of each
# other: on plan_quality's Llamas (8 simulated CPU devices) the estimate's choice measured 5-9%
# slower than a twin it put 1.7% behind, where measuring both chose right (benchmarks/RESULTS.md).
NEAR_TIE = 0.05
MAX_SUGGESTED = 4
# A timed run compiles the step in full (the search's analysis compiles skip backend
# optimisation) and its state's initializers: on XLA:CPU a full compile took 1.6x the analysis
# compile (3.3 s vs 2.1 s, a 100M-parameter candidate), and a small Llama's first timed run,
# initializers included, 1.35-1.56x.
FULL_COMPILE_FACTOR = 1.6
ROUNDS = 3  # interleaved timing rounds (module doc)


def near_ties(ranked: list[CandidateResult], share: float | None = None) -> list[CandidateResult]:
  """The feasible candidates estimated within `share` (default NEAR_TIE) of the best estimate, best first."""
  share = NEAR_TIE if share is None else share
  feasible = [c for c in ranked if c.verdict == FEASIBLE and c.est_time_s]
  if not feasible:
    return []
  best = min(c.est_time_s for c in feasible)
  return sorted((c for c in feasible if c.est_time_s <= best * (1 + share)), key=lambda c: c.est_time_s)


def predicted_measure_s(cands: list[CandidateResult], rounds: int = ROUNDS, timer: "StepTimer | None" = None) -> float:
  """About how long `rerank` takes on `cands`: each one's full compile (its analysis compile
  time x FULL_COMPILE_FACTOR) and `rounds` of `StepTimer` steps at its estimated step time."""
  timer = timer or StepTimer()
  return sum(FULL_COMPILE_FACTOR * c.compile_s + rounds * timer.round_s(c.est_time_s or 0.0) for c in cands)


def auto_top_k(ranked: list[CandidateResult], hardware, devices, budget_s: float) -> int:
  """How many candidates the search times by itself (`SearchSettings.measure_budget_s`); 0: none.

  The best estimates are near ties (within NEAR_TIE of the best; at most MAX_SUGGESTED of them)
  and the devices are the plan's target: they are timed when that is predicted to take at most
  `budget_s` and this is the only process (each process would time them apart and could choose
  differently). Otherwise the log says what measuring them would take and how to ask for it.
  """
  near = near_ties(ranked)[:MAX_SUGGESTED]
  k = len(near)
  if k < 2:
    return 0
  try:
    check_measurable(hardware, devices, k)
  except ValueError:  # planning for a target these devices are not: nothing to measure here
    return 0
  cost = predicted_measure_s(near)
  names = ", ".join(f"{c.plan} {fmt_time(c.est_time_s)}" for c in near)
  if budget_s > 0 and jax.process_count() == 1 and cost <= budget_s:
    log.info("%d feasible candidates are estimated within %.0f%% of the best (%s); the estimate does not "
             "order plans that close: timing them on the devices (predicted %.0f s, budget %.0f s: "
             "SearchSettings.measure_budget_s, AP_XLA_MEASURE_BUDGET; 0 chooses by the estimate alone).",
             k, NEAR_TIE * 100, names, cost, budget_s)
    return k
  why = ("automatic measuring is off (measure_budget_s=0)" if budget_s <= 0 else
         f"the devices belong to {jax.process_count()} processes, whose timings could choose differently"
         if jax.process_count() > 1 else
         f"timing them is predicted to take {cost:.0f} s, over the {budget_s:.0f} s budget "
         "(SearchSettings.measure_budget_s, AP_XLA_MEASURE_BUDGET)")
  log.info("%d feasible candidates are estimated within %.0f%% of the best (%s); the estimate does not order "
           "plans that close, and %s. AP_XLA_MEASURE_TOP_K=%d (SearchSettings.measure_top_k) would time the %d "
           "on the devices and choose the fastest.", k, NEAR_TIE * 100, names, why, k, k)
  return 0


def _random_like(tree: PyTree, shardings: PyTree, seed: int) -> PyTree:
  """Arrays of `tree`'s shapes and dtypes made directly in `shardings` (no host copy)."""
  leaves, treedef = jax.tree.flatten(tree)
  avals = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)
  return _random_maker(treedef, avals, tuple(treedef.flatten_up_to(shardings)), seed)()


@functools.lru_cache(maxsize=64)
def _random_maker(treedef, avals: tuple, shardings: tuple, seed: int) -> Callable[[], PyTree]:
  """The jitted maker of `_random_like`, kept: every timing round allocates a finalist's state
  afresh, and tracing and compiling the maker again took ~0.7 s a tree on the small Llama."""
  def make():
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (shape, dtype) in enumerate(avals):
      if jnp.issubdtype(dtype, jnp.floating):
        out.append((0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dtype))
      else:  # integer inputs (token ids): 0 is a valid index for any table
        out.append(jnp.zeros(shape, dtype))
    return jax.tree.unflatten(treedef, out)

  return jax.jit(make, out_shardings=jax.tree.unflatten(treedef, list(shardings)))


@functools.lru_cache(maxsize=64)
def _copier(treedef, shardings: tuple) -> Callable[[PyTree], PyTree]:
  """A jitted copy into `shardings`, kept across timing rounds (as `_random_maker`)."""
  return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=jax.tree.unflatten(treedef, list(shardings)))


def _place(tree: PyTree, shardings: PyTree, seed: int) -> PyTree:
  """Concrete arrays copied into `shardings` (never aliasing the caller's: the step donates
  them); abstract shapes random-initialized."""
  if is_abstract(tree):
    return _random_like(tree, shardings, seed)
  # A jitted copy, not device_put(may_alias=False): in jax 0.10.2 that still hands back the
  # caller's buffer as the device-0 shard of a replicated sharding, and the donating step
  # then deletes the caller's array.
  treedef = jax.tree.structure(tree)
  return _copier(treedef, tuple(treedef.flatten_up_to(shardings)))(tree)


class PlanRunner:
  """One plan built on the devices with its state allocated; `run_once()` runs one step.

  Example:
    >>> with PlanRunner(program, plan, devices) as r:
    ...   r.run_once()
  """

  def __init__(self, program: Program, plan: Plan, devices, built: BuiltStep | None = None):
    self.plan = plan
    if built is None:
      built = build_plan(program, plan, devices)
    self.built = built
    self.params = _place(program.params, built.param_shardings, 0)
    self.opt_state = built.init_opt(self.params)
    self.batch = _place(program.batch, built.batch_shardings, 1)
    self.loss = None

  def run_once(self) -> None:
    """One training step, waited for (params and state are donated and replaced)."""
    self.params, self.opt_state, self.loss = self.built.step(self.params, self.opt_state, self.batch)
    jax.block_until_ready((self.params, self.opt_state, self.loss))

  def close(self) -> None:
    """Frees the plan's device arrays now rather than when Python collects them."""
    for x in jax.tree.leaves((self.params, self.opt_state, self.batch, self.loss)):
      if isinstance(x, jax.Array) and not x.is_deleted():
        x.delete()
    self.params = self.opt_state = self.batch = self.loss = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@dataclasses.dataclass(frozen=True)
class StepTimer:
  """The default timer: `warmup` untimed steps (the first compiles), then at least `steps` timed
  ones, more until they add up to `min_time_s` (at most `max_steps`); their median.

  Short steps vary more, one by one, than near ties differ: 80 ms steps of plan_quality's Llama
  on 8 simulated CPU devices spread 4-7% (interquartile), where its near ties lie 2-8% apart. A
  few more of them cost little beside the compile a timed candidate needs; long steps (a large
  model on a GPU) are timed `steps` times.
  """
  warmup: int = 1
  steps: int = 3
  min_time_s: float = 0.5
  max_steps: int = 50

  def __post_init__(self):
    for f, lo in (("warmup", 0), ("steps", 1), ("max_steps", self.steps)):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"StepTimer.{f} must be an int >= {lo}, got {v!r}.")
    v = self.min_time_s
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf"):
      raise ValueError(f"StepTimer.min_time_s must be a number of seconds >= 0, got {v!r}.")

  def samples(self, run_once: Callable[[], None]) -> list[float]:
    for _ in range(self.warmup):
      run_once()
    out = []
    while len(out) < self.steps or (sum(out) < self.min_time_s and len(out) < self.max_steps):
      t0 = time.perf_counter()
      run_once()
      out.append(time.perf_counter() - t0)
    return out

  def round_s(self, step_s: float) -> float:
    """About how long one call takes for steps of `step_s` seconds (compiling not counted)."""
    timed = min(max(self.steps * step_s, self.min_time_s), self.max_steps * step_s)
    return self.warmup * step_s + timed

  def __call__(self, plan: Plan, run_once: Callable[[], None]) -> float:
    return statistics.median(self.samples(run_once))


def _error_text(e: BaseException) -> str:
  return " ".join(f"{type(e).__name__}: {e}".strip().splitlines())[:2000]


def _time_once(program: Program, cand: CandidateResult, devices, timer: Timer,
               built: BuiltStep | None) -> float:
  """One timed run of a candidate with its state allocated for it and freed after."""
  with PlanRunner(program, cand.plan, devices, built) as runner:
    seconds = float(timer(cand.plan, runner.run_once))
  if not seconds > 0:
    raise ValueError(f"the timer returned {seconds!r} s for {cand.plan}; expected a positive time.")
  return seconds


def _failed(cand: CandidateResult, e: BaseException) -> CandidateResult:
  reason = f"failed at run time: {_error_text(e)}"
  log.warning("  %s %s", cand.plan, reason[:300])
  return dataclasses.replace(cand, verdict=COMPILE_ERROR, reason=reason,
                             details={**cand.details, "measure_error": _error_text(e)})


def _measured(cand: CandidateResult, times: list[float]) -> CandidateResult:
  seconds = statistics.median(times)
  ratio = cand.est_time_s / seconds if cand.est_time_s else None
  details = {**cand.details, "measured_s": seconds, "measured_rounds_s": list(times), "est_over_measured": ratio}
  reason = f"measured {fmt_time(seconds)} (est. {fmt_time(cand.est_time_s)}"
  reason += f", est/measured {ratio:.2f})" if ratio is not None else ")"
  return dataclasses.replace(cand, reason=reason, details=details)


def measure_interleaved(program: Program, cands: list[CandidateResult], devices, timer: Timer,
                        rounds: int, deadline: float | None = None) -> dict[Plan, CandidateResult]:
  """Times `cands` in `rounds` interleaved rounds (module doc): {plan: measured, failed or as given}.

  Each candidate is built once; every round allocates its state, calls `timer` once and frees
  the state before the next candidate runs. A candidate that fails in any round is failed and
  leaves the later rounds. Past `deadline` (a `time.perf_counter()` value) no run starts and
  only the rounds every remaining candidate completed count; a candidate with none is returned
  as given (unmeasured).
  """
  built: dict[Plan, BuiltStep] = {}
  times: dict[Plan, list[float]] = {c.plan: [] for c in cands}
  out: dict[Plan, CandidateResult] = {}
  stopped = False
  for r in range(rounds):
    alive = [c for c in cands if c.plan not in out]
    for cand in (alive if r % 2 == 0 else alive[::-1]):
      if deadline is not None and time.perf_counter() > deadline:
        stopped = True
        break
      try:
        if cand.plan not in built:
          built[cand.plan] = build_plan(program, cand.plan, devices)
        times[cand.plan].append(_time_once(program, cand, devices, timer, built[cand.plan]))
      except Exception as e:  # a candidate that fails at run time is a result, not a crash
        out[cand.plan] = _failed(cand, e)
        built.pop(cand.plan, None)
    if stopped:
      break
  alive = [c for c in cands if c.plan not in out]
  complete = min((len(times[c.plan]) for c in alive), default=0)
  if stopped:
    log.info("Measuring stopped at its time budget after %d complete round(s) of %d.", complete, rounds)
  for cand in alive:
    out[cand.plan] = _measured(cand, times[cand.plan][:complete]) if complete else cand
  return out


def rerank(program: Program, ranked: list[CandidateResult], devices, k: int, *,
           timer: Timer | None = None, rounds: int = ROUNDS, budget_s: float | None = None,
           advisory: bool = False) -> list[CandidateResult]:
  """Measures the `k` best-estimated feasible candidates and puts the measured-fastest first.

  Args:
    program: the training program (concrete params are copied; abstract ones random-initialized).
    ranked: the candidates ranked by estimate (`report.rank`).
    devices: the devices to run on.
    k: how many feasible candidates to run (at least 1).
    timer: `timer(plan, run_once) -> seconds`, called once per candidate per round; default
      `StepTimer()` (after 1 warm-up step, the median of at least 3 steps and 0.5 s of them).
    rounds: interleaved rounds (module doc); a candidate's time is the median of its rounds.
    budget_s: no timed run starts after this many seconds (None: no limit); the rounds every
      candidate completed count, and with none the estimate's order stands.
    advisory: the search's own timing of near ties (`auto_top_k`): a candidate that fails when
      run does not reject it (compiled memory decides feasibility, and a timed run also holds
      the program's own arrays beside the plan's); the timing is then dropped, the estimate's
      order kept and the failure logged and noted in its details ('measure_error').

  Returns:
    The candidates re-ranked: measured ones fastest first, then unmeasured feasible ones by
    estimate, then the rejected ones (including those that failed at run time).

  Raises:
    ValueError: k is not a positive int.
    OutOfMemoryError: every feasible candidate was measured and all of them failed.

  Example:
    >>> ranked = rerank(program, rank(results), jax.devices(), k=3)
    >>> ranked[0].details['measured_s']
  """
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"rerank: k must be a positive int (how many candidates to run), got {k!r}.")
  if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
    raise ValueError(f"rerank: rounds must be a positive int (interleaved timing rounds), got {rounds!r}.")
  timer = timer or StepTimer()
  feasible = [c for c in ranked if c.verdict == FEASIBLE]
  top = feasible[:k]
  log.info("Measuring the %d best-estimated of %d feasible candidates on %d devices, %d interleaved round(s).",
           len(top), len(feasible), len(devices), rounds)
  deadline = None if budget_s is None else time.perf_counter() + budget_s
  measured = measure_interleaved(program, top, devices, timer, rounds, deadline)
  failed = {p: m for p, m in measured.items() if m.verdict == COMPILE_ERROR}
  if advisory and failed:
    log.warning("%d of the %d timed near ties failed when run (%s); keeping the estimate's order: compiled "
                "memory decides what fits, and the timed run also held the program's own arrays.", len(failed),
                len(top), "; ".join(f"{p}: {m.details['measure_error'][:200]}" for p, m in failed.items()))
    return [dataclasses.replace(c, details={**c.details, "measure_error": failed[c.plan].details["measure_error"]})
            if c.plan in failed else c for c in ranked]
  for i, cand in enumerate(top):
    m = measured[cand.plan]
    if "measured_s" in m.details:
      log.info("  #%d %s: estimated %s, measured %s (estimate/measured = %.2f)", i, cand.plan,
               fmt_time(cand.est_time_s), fmt_time(m.details["measured_s"]),
               m.details["est_over_measured"] or float("nan"))
  ok = sorted((m for m in measured.values() if "measured_s" in m.details),
              key=lambda m: (m.details["measured_s"], m.memory_bytes or 0))
  winners = {m.plan for m in ok}
  rest = rank([measured.get(c.plan, c) for c in ranked if c.plan not in winners])
  if ok:
    best = ok[0]
    est_rank = [c.plan for c in top].index(best.plan)
    ratios = [m.details["est_over_measured"] for m in ok if m.details["est_over_measured"]]
    log.info("Chose %s: fastest measured (%s) of %d run; the estimate ranked it #%d. Estimate/measured "
             "ranged %.2f..%.2f.", best.plan, fmt_time(best.details["measured_s"]), len(ok), est_rank,
             min(ratios) if ratios else float("nan"), max(ratios) if ratios else float("nan"))
    ok[0] = dataclasses.replace(best, reason=f"fastest measured of {len(ok)} run: {best.reason}")
    return ok + rest
  if any(c.verdict == FEASIBLE for c in rest):
    if all(m.verdict == COMPILE_ERROR for m in measured.values()):
      log.warning("All %d measured candidates failed at run time; keeping the best estimate of the "
                  "unmeasured ones.", len(top))
    else:
      log.info("No candidate completed a round of timing within the budget; keeping the estimate's order.")
    return rest
  raise OutOfMemoryError(
      "Every feasible candidate failed when run on the devices:\n" +
      "\n".join(f"  {m.plan}: {m.reason[:300]}" for m in measured.values()), rest)
