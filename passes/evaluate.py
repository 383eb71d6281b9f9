"""Compiles one candidate from abstract shapes and reads its memory and cost."""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax

from passes import cost_model, gpu_target, hlo_stats, memory
from passes.hardware import HardwareProfile, is_host_profile
from passes.build import derive_program_tp, edge_tp_dim, tp_dims  # noqa: F401 (re-exported)
from passes.plan import Plan
from passes.program import Program
from passes.report import COMPILE_ERROR, FEASIBLE, OVER_BUDGET, CandidateResult, fmt_bytes
from passes.step import build_step
from passes.tp_rules import TPRules

PyTree = Any
log = logging.getLogger("ap_xla")


# Per-compile options for analysis-only compiles, per backend, checked there: LLVM at -O0
# without its expensive passes. On XLA:CPU it compiles a 97.5M-parameter candidate in 2.0-2.4 s
# instead of 2.5-3.6 s with byte-identical memory analysis and identical FLOPs (FIELD_NOTES). On
# XLA:GPU without a device (passes/gpu_target.py) 8 plans of a tiny Llama and llama2-7b (FSDP,
# recomputation, TP 4, a pipeline) compiled in 8-25% fewer CPU seconds with identical memory
# analysis, FLOPs, collectives and kernel bytes; the PTX is what it changes.
_LLVM_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ANALYSIS_OPTIONS = {"cpu": _LLVM_FAST, "gpu": _LLVM_FAST}


@functools.cache
def analysis_options(device) -> dict:
  """The analysis compile options of `device`'s platform that its compiler accepts ({} if none).

  Args:
    device: a jax device (or a platform name, for that platform's first device); checked by
      compiling a tiny program for it, which works for a compile-only (deviceless) GPU too.
  """
  if isinstance(device, str):
    device = jax.devices(device)[0]
  opts = ANALYSIS_OPTIONS.get(device.platform, {})
  if not opts:
    return {}
  try:
    x = jax.ShapeDtypeStruct((2,), "float32", sharding=jax.sharding.SingleDeviceSharding(device))
    jax.jit(lambda v: v + 1).lower(x).compile(compiler_options=opts)
  except Exception as e:  # an unknown option name on this jaxlib: compile without them
    log.warning("Compiling without the analysis options %s on %s: %s", opts, device.platform, e)
    return {}
  return dict(opts)


def compile_plan(program: Program, plan: Plan, devices, dims, compiler_options: dict | None = None):
  """Lowers and compiles a plan's step from abstract shapes (nothing is allocated), for analysis.

  Args:
    compiler_options: per-compile XLA options; None: the devices' `analysis_options` (their
      memory analysis and HLO are those of the default compile; nothing compiled here runs).
  """
  opts = analysis_options(devices[0]) if compiler_options is None else compiler_options
  with gpu_target.tracing_for(devices):  # what the program traces to is the devices' (attention)
    lowered = build_step(program, plan, devices, dims).lower(program)
  return lowered.compile(compiler_options=opts) if opts else lowered.compile()


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """What every candidate's evaluation shares.

  `compile_fn(program, plan, devices, tp_dims) -> compiled` is replaceable so tests can
  inject compile failures and delays. `devices` are those candidates compile for (a
  `gpu_target.CompileRoute`'s); `route` names where the figures come from (the route's name).
  """
  program: Program
  devices: tuple
  hardware: HardwareProfile
  budget_bytes: int
  tp_rules: TPRules | None
  compile_fn: Callable = compile_plan
  route: str = ""

  def __call__(self, plan: Plan) -> CandidateResult:
    t0 = time.perf_counter()
    dims = tp_dims(self.program, self.tp_rules, plan.tp)
    # Only building, lowering and compiling the user's program for this plan can fail in a way
    # that rejects the candidate. The analysis below is our own code: an error there is a bug
    # of the pass and propagates (the search re-raises it) instead of posing as a compile error.
    try:
      compiled = self.compile_fn(self.program, plan, self.devices, dims)
    except Exception as e:  # a failing candidate is a result, not a crash of the search
      msg = f"{type(e).__name__}: {e}".strip().splitlines()
      return CandidateResult(plan, COMPILE_ERROR, reason=" ".join(msg)[:2000],
                             compile_s=time.perf_counter() - t0, route=self.route)
    dt = time.perf_counter() - t0
    # XLA:CPU's dot scratch is charged to runs on these CPU devices, not to another target
    # simulated on them (ap-xla plan --hardware h100).
    stats = hlo_stats.analyze_hlo(compiled.as_text())
    platform = self.devices[0].platform
    mem = memory.memory_stats(compiled, platform if platform != "cpu" or is_host_profile(self.hardware) else None,
                              stats)
    cost = cost_model.estimate_step_time(stats, plan, self.hardware)
    details = {"memory": dataclasses.asdict(mem), "cost": _cost_dict(cost), "flops": stats.flops}
    if mem.total > self.budget_bytes:
      over = mem.total - self.budget_bytes
      return CandidateResult(plan, OVER_BUDGET, mem.total, cost.total_s, reason=f"over budget by {fmt_bytes(over)}",
                             compile_s=dt, details=details, route=self.route)
    return CandidateResult(plan, FEASIBLE, mem.total, cost.total_s, compile_s=dt, details=details, route=self.route)


def _cost_dict(cost) -> dict:
  d = dataclasses.asdict(cost)
  return {k: v for k, v in d.items() if isinstance(v, (int, float, str, dict))}
