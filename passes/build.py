"""One plan's step, built: the tensor-parallel rules of the program, the per-leaf 'tensor'
dims of the plan, and the sharded step (`passes.step.build_step`).

The search, the trainer, the torch front end, the measured re-ranking and the benchmarks all
build a chosen plan through `build_plan`, so a plan means the same program everywhere.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from passes.plan import TENSOR, Plan
from passes.program import BLOCKS, POST, PRE, Program
from passes.step import BuiltStep, build_step
from passes.tp_rules import TPRules, derive_tp_rules

PyTree = Any


def derive_program_tp(program: Program) -> TPRules:
  """TP rules from the dataflow: of one block for a layered program, else of the whole loss."""
  program = program.abstract()
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


def build_plan(program: Program, plan: Plan, devices, tp_rules: TPRules | None = None) -> BuiltStep:
  """The sharded training step of `plan` for `program` (`passes.step.BuiltStep`).

  Args:
    program: the training program (arrays or ShapeDtypeStructs).
    plan: the plan.
    devices: at least `plan.num_devices` devices.
    tp_rules: the program's TP rules when the caller has them; derived here when the plan
      has tensor parallelism and none are given.

  Example:
    >>> built = build_plan(program, Plan(dp=4, tp=2), jax.devices())
    >>> params, opt_state, loss = built.step(params, opt_state, batch)
  """
  if plan.tp > 1 and tp_rules is None:
    tp_rules = derive_program_tp(program)
  return build_step(program, plan, devices, tp_dims(program, tp_rules, plan.tp))
