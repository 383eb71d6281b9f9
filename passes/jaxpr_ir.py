"""The jaxpr walker's own IR: calls inlined with fresh value ids, then XLA's CSE and DCE.

`passes.jaxpr_cost` lowers a traced function here before it reads its costs: every call
(`pjit`, `jax.checkpoint`, custom derivatives) is inlined, an equation repeating one already
lowered (a nested `jax.checkpoint` recomputing what its caller computed) reuses its outputs,
and equations whose outputs reach no output are dropped, as XLA does before it forms kernels.
The primitive classes here (elementwise, fusible, reductions) are shared by the TP-dim rules
(`passes.jaxpr_tp`), the kernel model and the liveness (`passes.jaxpr_liveness`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from jax.extend.core import Jaxpr, ClosedJaxpr, Literal

from passes.hlo_stats import ATTENTION_SCOPE, CAUSAL_SUFFIX

# Calls whose sub-jaxpr takes exactly the call's operands: inlined.
CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call",
         "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "max", "min", "pow", "integer_pow", "neg", "exp", "exp2", "log",
    "log1p", "expm1", "tanh", "logistic", "erf", "erfc", "erf_inv", "sqrt", "rsqrt", "cbrt", "abs", "sign",
    "sin", "cos", "tan", "square", "floor", "ceil", "round", "rem", "atan2", "select_n", "clamp", "eq",
    "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "is_finite", "stop_gradient", "nextafter",
    "real", "imag", "convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
    "optimization_barrier", "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count"}
# Shape ops XLA fuses into their consumer (no kernel of their own).
FUSIBLE = ELEMENTWISE | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "iota",
                         "slice", "concatenate", "pad", "rev", "split", "dynamic_slice"}
REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
              "reduce_xor", "argmax", "argmin"}


def nbytes(aval) -> int:
  """Bytes of one value of `aval` (extended dtypes such as PRNG keys count 8 per element)."""
  shape = getattr(aval, "shape", ())
  dtype = getattr(aval, "dtype", None)
  if dtype is None:
    return 0
  try:
    size = np.dtype(dtype).itemsize
  except TypeError:  # extended dtypes (PRNG keys): their data is a few words
    size = 8
  return int(math.prod(shape)) * size


class Eqn:
  """An equation of the walker's own IR: primitive name, params, input ids (None for a
  literal), output ids, whether it ran under ATTENTION_SCOPE. Ids index `Program.avals`;
  calls are inlined with fresh ids."""
  __slots__ = ("name", "params", "ins", "outs", "att")

  def __init__(self, name, params, ins, outs, att=False):
    self.name, self.params, self.ins, self.outs, self.att = name, params, ins, outs, att


class Program:
  """Fresh ids for the values of inlined jaxprs.

  Lowering inlines calls and then does what XLA does before it forms kernels: an equation
  that repeats one already lowered (same primitive, parameters and inputs: a nested
  `jax.checkpoint` recomputing what its caller computed) reuses its outputs (CSE), and
  equations whose outputs nothing uses are dropped (DCE, `dce`)."""

  def __init__(self):
    self.avals: list = []
    self._seen: dict = {}  # CSE key -> output ids
    self._literals: dict = {}  # (aval, value) -> the id of a literal passed into a call

  def new(self, aval) -> int:
    self.avals.append(aval)
    return len(self.avals) - 1

  def literal(self, lit: Literal) -> int:
    """The id of a literal passed into a call: one id per value, as XLA folds equal constants
    into one (two calls of `jnp.where(m, x, -inf)` then compute the same, and CSE merges them)."""
    key = (str(lit.aval), repr(lit.val))
    if key not in self._literals:
      self._literals[key] = self.new(lit.aval)
    return self._literals[key]

  def lower(self, jaxpr: Jaxpr, args: Sequence, att=False) -> tuple[list, list]:
    """(equations, output ids) of `jaxpr` applied to the ids `args`, calls inlined; `att`:
    it runs under ATTENTION_SCOPE (a sub-jaxpr's name stacks are its own, not its caller's)."""
    env = dict(zip(jaxpr.invars, args))
    for v in jaxpr.constvars:
      env[v] = self.new(v.aval)
    get = lambda a: None if isinstance(a, Literal) else env[a]
    eqns = []
    for e in jaxpr.eqns:
      ins = [get(a) for a in e.invars]
      stack = str(e.source_info.name_stack)
      e_att = att or ("causal" if ATTENTION_SCOPE + CAUSAL_SUFFIX in stack else
                      "full" if ATTENTION_SCOPE in stack else False)
      sub = e.params.get("jaxpr", e.params.get("call_jaxpr", e.params.get("fun_jaxpr")))
      inner = sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub
      if (e.primitive.name in CALLS and isinstance(inner, Jaxpr) and len(inner.invars) == len(ins)
          and len(inner.outvars) == len(e.outvars)):
        sub_eqns, outs = self.lower(inner, [i if i is not None else self.literal(a)
                                            for i, a in zip(ins, e.invars)], e_att)
        eqns.extend(sub_eqns)
        for v, o in zip(e.outvars, outs):
          env[v] = o if o is not None else self.new(v.aval)
        continue
      if e.primitive.name == "name" and len(ins) == 1:  # checkpoint_name: the value itself, no kernel
        env[e.outvars[0]] = ins[0] if ins[0] is not None else self.new(e.outvars[0].aval)
        continue
      key = cse_key(e, ins)
      if key is not None and key in self._seen:
        for v, o in zip(e.outvars, self._seen[key]):
          env[v] = o
        continue
      outs = [self.new(v.aval) for v in e.outvars]
      for v, o in zip(e.outvars, outs):
        env[v] = o
      if key is not None:
        self._seen[key] = outs
      eqns.append(Eqn(e.primitive.name, e.params, ins, outs, e_att))
    return eqns, [get(v) for v in jaxpr.outvars]


def cse_key(e, ins):
  """A hashable identity of equation `e` on the value ids `ins`, or None where it must not be
  merged (effects, randomness, unhashable parameters)."""
  if e.effects or "random" in e.primitive.name or "rng" in e.primitive.name:
    return None
  lits = tuple(repr(a.val) if isinstance(a, Literal) else None for a in e.invars)
  try:
    key = (e.primitive.name, tuple(sorted(e.params.items())), tuple(ins), lits,
           tuple(str(v.aval) for v in e.outvars))
    hash(key)
  except TypeError:
    return None
  return key


def dce(eqns: list, outs: Sequence) -> list:
  """`eqns` without those whose outputs reach no output (in reverse order, so chains go)."""
  used = {o for o in outs if o is not None}
  kept = []
  for e in reversed(eqns):
    if any(o in used for o in e.outs):
      kept.append(e)
      used.update(a for a in e.ins if a is not None)
  return kept[::-1]
