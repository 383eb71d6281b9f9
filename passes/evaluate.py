"""Compiles one candidate from abstract shapes and reads its memory and cost."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec as P

from passes import cost_model, hlo_stats, memory
from passes.hardware import HardwareProfile, is_host_profile
from passes.plan import TENSOR, Plan
from passes.program import BLOCKS, POST, PRE, Program
from passes.report import COMPILE_ERROR, FEASIBLE, OVER_BUDGET, CandidateResult, fmt_bytes
from passes.step import build_step
from passes.tp_rules import TPRules, derive_tp_rules

PyTree = Any


def derive_program_tp(program: Program) -> TPRules:
  """TP rules from the dataflow: of one block for a layered program, else of the whole loss."""
  if program.layers is None:
    return derive_tp_rules(program.loss_fn, program.params, program.batch)
  block0 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), program.params[BLOCKS])
  hidden, aux = jax.eval_shape(program.layers.pre, program.params[PRE], program.batch)
  return derive_tp_rules(program.layers.block, block0, hidden, aux)


def tp_dims(program: Program, rules: TPRules | None, tp: int) -> PyTree | None:
  """Per-leaf dim to shard over 'tensor' for a TP degree (None: no tensor parallelism).

  Block weights follow the Megatron rules derived from the dataflow. In a layered program the
  pre and post matrices (token embedding, LM head) are sharded too, along their largest
  dimension (`edge_tp_dim`): for those that is the vocabulary, and GSPMD inserts the
  collectives a vocabulary-parallel embedding and softmax need. Left replicated, they made
  every TP plan of a small model slower than pure data parallelism (benchmarks/plan_quality.py).
  """
  if tp == 1 or rules is None:
    return None
  def dim(spec):
    return next((i for i, a in enumerate(spec) if a == TENSOR), None)
  is_spec = lambda x: isinstance(x, P)
  if program.layers is None:
    return jax.tree.map(dim, rules.specs(tp), is_leaf=is_spec)
  edge = lambda x: edge_tp_dim(x.shape, tp)
  return {PRE: jax.tree.map(edge, program.params[PRE]),
          BLOCKS: jax.tree.map(dim, rules.specs(tp, prefix=(None,)), is_leaf=is_spec),
          POST: jax.tree.map(edge, program.params[POST])}


def edge_tp_dim(shape: tuple, tp: int) -> int | None:
  """The dim of a pre/post parameter to shard over 'tensor': its largest when it divides by
  `tp` (the first of equals); None for vectors and scalars, which stay replicated."""
  if len(shape) < 2:
    return None
  d = max(range(len(shape)), key=lambda i: (shape[i], -i))
  return d if shape[d] % tp == 0 else None


def compile_plan(program: Program, plan: Plan, devices, dims):
  """Lowers and compiles a plan's step from abstract shapes (nothing is allocated)."""
  return build_step(program, plan, devices, dims).lower(program).compile()


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """What every candidate's evaluation shares.

  `compile_fn(program, plan, devices, tp_dims) -> compiled` is replaceable so tests can
  inject compile failures and delays.
  """
  program: Program
  devices: tuple
  hardware: HardwareProfile
  budget_bytes: int
  tp_rules: TPRules | None
  compile_fn: Callable = compile_plan

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
                             compile_s=time.perf_counter() - t0)
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
      return CandidateResult(plan, OVER_BUDGET, mem.total, cost.total_s,
                             reason=f"over budget by {fmt_bytes(over)}", compile_s=dt, details=details)
    return CandidateResult(plan, FEASIBLE, mem.total, cost.total_s, compile_s=dt, details=details)


def _cost_dict(cost) -> dict:
  d = dataclasses.asdict(cost)
  return {k: v for k, v in d.items() if isinstance(v, (int, float, str, dict))}
