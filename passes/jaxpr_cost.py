"""What a traced function costs per device, read from its jaxpr: FLOPs, kernels, tensor-axis
collectives and the peak of the values it keeps live, without compiling it.

The analytic screen (`passes.screen`) traces each part of a program (pre, one block, post)
once and reads its costs here; a plan's figures are then sums over parts, layers and
micro-batches. Nothing here knows a model: every figure comes from the jaxpr's shapes.

Tensor parallelism. The caller says which dim of each input is sharded over the 'tensor'
axis (`in_dims`, from the plan's TP rules). The dims follow the dataflow the way GSPMD
shards Megatron blocks: elementwise ops keep them, shape ops move them, a matmul keeps a
sharded free or batch dim; a matmul contracting a sharded dim (row parallel), a reduction
over it, or a gather from a table sharded along it leaves its result replicated after an
all-reduce over 'tensor' (`Comm('all-reduce', ...)`); any other op touching a sharded dim
gathers its operand first (`Comm('all-gather', ...)`). A value's per-device bytes are its
bytes / tp when it carries a sharded dim.

Kernels, as XLA forms them (approximately, for the roofline of `passes.cost_model`): every
matmul is one kernel (its FLOPs; operands and result moved); elementwise and shape ops fuse
into the kernel of the value they feed, unless that value is *materialized*: the result of a
matmul, reduction, gather, scatter, sort, loop or collective, an operand of a matmul or of
such an op, or an output. A fused kernel writes its materialized result and reads the
materialized values it depends on. This is the screen's model of fusion; the screen's
calibration against compiled candidates (`passes.screen.Calibration`) absorbs the difference.

Liveness: `peak_bytes` is the most bytes of materialized values created inside the function
that are live at once, walking the equations in order (a loop adds its body's own peak), per
device; `largest` is the largest single such value.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from passes.hlo_stats import ATTENTION_SCOPE, CAUSAL_SUFFIX

# Calls whose sub-jaxpr takes exactly the call's operands: inlined.
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
_ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "max", "min", "pow", "integer_pow", "neg", "exp", "exp2", "log",
    "log1p", "expm1", "tanh", "logistic", "erf", "erfc", "erf_inv", "sqrt", "rsqrt", "cbrt", "abs", "sign",
    "sin", "cos", "tan", "square", "floor", "ceil", "round", "rem", "atan2", "select_n", "clamp", "eq",
    "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "is_finite", "stop_gradient", "nextafter",
    "real", "imag", "convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
    "optimization_barrier", "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count"}
# Shape ops XLA fuses into their consumer (no kernel of their own).
_FUSIBLE = _ELEMENTWISE | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "iota",
                           "slice", "concatenate", "pad", "rev", "split", "dynamic_slice"}
# A value summed over 'tensor' but not yet reduced (after a matmul contracting a sharded dim):
# GSPMD reduces it where a non-linear op first needs it, so adds of partial sums (q, k and v's
# input gradients) cost one all-reduce, as XLA's all-reduce reassociation makes them.
PARTIAL = "partial"
_LINEAR = {"add", "add_any", "sub", "neg", "convert_element_type", "reshape", "transpose", "broadcast_in_dim",
           "squeeze", "expand_dims", "copy", "copy_p", "reduce_sum", "mul", "div"}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
               "reduce_xor", "argmax", "argmin"}


@dataclasses.dataclass(frozen=True)
class Comm:
  """One collective over the 'tensor' axis, per device: its kind, result bytes and run count."""
  kind: str
  bytes: int
  count: int = 1


@dataclasses.dataclass(frozen=True)
class JaxprCost:
  """Per-device costs of one call of a traced function (loops unrolled).

  Attributes:
    flops: FLOPs of its matmuls and convolutions (2 per multiply-add).
    kernels: (flops, bytes moved, count) per kernel (module doc), as `hlo_stats.Kernel`s.
    comms: the 'tensor'-axis collectives the dataflow needs (module doc).
    peak_bytes: the most bytes of materialized values created inside live at once.
    largest: (bytes, description) of the largest such value: the temporary a kernel-level
      model (e.g. fused attention) would replace.
    out_bytes: per-device bytes of each output.
    out_sources: per output, the index of the input it passes through unchanged, or -1.
    out_dims: per output, its dim sharded over 'tensor' (None: replicated).
    out_deps: per output, the bitmask of the input groups it depends on (`analyze`'s groups).
    out_repeats: per output, whether it is the same value as an earlier output.
    attention: indices into `kernels` of those traced under `ATTENTION_SCOPE` (the fused
      attention of `bridge.attention`), which a target running flash attention replaces.
    attention_causal: per `attention` entry, whether it ran under the causal scope.
  """
  flops: float
  kernels: tuple
  comms: tuple[Comm, ...]
  peak_bytes: int
  largest: tuple[int, str]
  out_bytes: tuple[int, ...]
  out_sources: tuple[int, ...]
  out_dims: tuple
  out_deps: tuple = ()
  out_repeats: tuple = ()
  attention: tuple = ()
  attention_causal: tuple = ()

  @property
  def kernel_bytes(self) -> float:
    return sum(k[1] * k[2] for k in self.kernels)


def _nbytes(aval) -> int:
  shape = getattr(aval, "shape", ())
  dtype = getattr(aval, "dtype", None)
  if dtype is None:
    return 0
  try:
    size = np.dtype(dtype).itemsize
  except TypeError:  # extended dtypes (PRNG keys): their data is a few words
    size = 8
  return int(math.prod(shape)) * size


def _reshape_dim(in_shape, out_shape, dim):
  """The output dim a reshape moves `dim` to (the one at the same outer offset), or None."""
  outer = math.prod(in_shape[:dim])
  for j, s in enumerate(out_shape):
    if math.prod(out_shape[:j]) == outer and s > 1:
      return j if s % in_shape[dim] == 0 or in_shape[dim] % s == 0 else None
  return None


def _move(name, p, in_shape, out_shape, d):
  """Where a shape op moves sharded dim d; None when the op acts along it."""
  if name == "transpose":
    return list(p["permutation"]).index(d)
  if name == "broadcast_in_dim":
    return p["broadcast_dimensions"][d] if in_shape[d] == out_shape[p["broadcast_dimensions"][d]] else None
  if name == "squeeze":
    return d - sum(a < d for a in p["dimensions"])
  if name == "expand_dims":
    return d + sum(a <= d for a in p["dimensions"])
  if name == "reshape":
    return _reshape_dim(in_shape, out_shape, d)
  if name in ("slice", "dynamic_slice", "pad", "rev"):
    return d if in_shape[d] == out_shape[d] else None
  if name in ("concatenate", "split"):
    return None if p.get("dimension", p.get("axis")) == d else d
  if name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort"):
    return None if p.get("axis", p.get("dimension")) == d else d
  return None


class _Eqn:
  """An equation of the walker's own IR: primitive name, params, input ids (None for a
  literal), output ids, whether it ran under ATTENTION_SCOPE. Ids index `_Program.avals`;
  calls are inlined with fresh ids."""
  __slots__ = ("name", "params", "ins", "outs", "att")

  def __init__(self, name, params, ins, outs, att=False):
    self.name, self.params, self.ins, self.outs, self.att = name, params, ins, outs, att


class _Program:
  """Fresh ids for the values of inlined jaxprs.

  Lowering inlines calls and then does what XLA does before it forms kernels: an equation
  that repeats one already lowered (same primitive, parameters and inputs: a nested
  `jax.checkpoint` recomputing what its caller computed) reuses its outputs (CSE), and
  equations whose outputs nothing uses are dropped (DCE)."""

  def __init__(self):
    self.avals: list = []
    self._seen: dict = {}  # CSE key -> output ids

  def new(self, aval) -> int:
    self.avals.append(aval)
    return len(self.avals) - 1

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
      if (e.primitive.name in _CALLS and isinstance(inner, Jaxpr) and len(inner.invars) == len(ins)
          and len(inner.outvars) == len(e.outvars)):
        sub_eqns, outs = self.lower(inner, [i if i is not None else self.new(a.aval)
                                            for i, a in zip(ins, e.invars)], e_att)
        eqns.extend(sub_eqns)
        for v, o in zip(e.outvars, outs):
          env[v] = o if o is not None else self.new(v.aval)
        continue
      if e.primitive.name == "name" and len(ins) == 1:  # checkpoint_name: the value itself, no kernel
        env[e.outvars[0]] = ins[0] if ins[0] is not None else self.new(e.outvars[0].aval)
        continue
      key = _cse_key(e, ins)
      if key is not None and key in self._seen:
        for v, o in zip(e.outvars, self._seen[key]):
          env[v] = o
        continue
      outs = [self.new(v.aval) for v in e.outvars]
      for v, o in zip(e.outvars, outs):
        env[v] = o
      if key is not None:
        self._seen[key] = outs
      eqns.append(_Eqn(e.primitive.name, e.params, ins, outs, e_att))
    return eqns, [get(v) for v in jaxpr.outvars]


def _cse_key(e, ins):
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


def _dce(eqns: list, outs: Sequence) -> list:
  """`eqns` without those whose outputs reach no output (in reverse order, so chains go)."""
  used = {o for o in outs if o is not None}
  kept = []
  for e in reversed(eqns):
    if any(o in used for o in e.outs):
      kept.append(e)
      used.update(a for a in e.ins if a is not None)
  return kept[::-1]


class _Walker:
  """Abstract interpretation of a jaxpr for one tensor-parallel degree (module doc)."""

  def __init__(self, tp: int, prog: _Program):
    self.tp, self.prog = tp, prog
    self.flops = 0.0
    self.kernels: list[tuple] = []  # (flops, bytes, count), in walk order
    self.attention: list[tuple] = []  # (index, causal) of the kernels under ATTENTION_SCOPE
    self.att = False  # walking a sub-jaxpr under ATTENTION_SCOPE: 'causal' or 'full'; else False
    self.comms: list[Comm] = []
    self.largest = (0, "")
    self.deps: dict[int, int] = {}  # value id -> bitmask of the input groups it depends on
    self.out_hints: list = []  # dims the caller shards the top-level outputs on

  def size(self, i, dims) -> int:
    if i is None:
      return 0
    b = _nbytes(self.prog.avals[i])
    return b // self.tp if isinstance(dims.get(i), int) and self.tp > 1 else b

  def shape(self, i) -> tuple:
    return tuple(getattr(self.prog.avals[i], "shape", ()))

  def comm(self, kind, nbytes, count):
    if self.tp > 1 and nbytes:
      self.comms.append(Comm(kind, int(nbytes), count))

  def kernel(self, flops, nbytes, count, att=False):
    if att:
      self.attention.append((len(self.kernels), att == "causal"))
    self.kernels.append((float(flops), float(nbytes), count))

  def walk(self, jaxpr: Jaxpr, in_dims: Sequence, count: float, args=None) -> tuple[list, list, int]:
    """Walks `jaxpr` run `count` times; returns (output ids, their dims, its own peak bytes)."""
    top = args is not None  # the caller's function (nested loops and calls get fresh ids)
    args = args if args is not None else [self.prog.new(v.aval) for v in jaxpr.invars]
    eqns, outs = self.prog.lower(jaxpr, args, self.att)
    eqns = _dce(eqns, outs)
    dims: dict = dict(zip(args, in_dims))
    consumers: dict[int, list] = {}
    for e in eqns:
      for a in e.ins:
        if a is not None:
          consumers.setdefault(a, []).append(e)
    out_set = {o for o in outs if o is not None}
    producer: dict[int, _Eqn] = {}
    materialized = set(args)
    inner_peak = []
    for e in eqns:
      ins = [dims.get(a) if a is not None else None for a in e.ins]
      if PARTIAL in ins:
        if self.keeps_partial(e, ins):
          out_dims, peak = [PARTIAL] * len(e.outs), 0
        else:
          for a, d in zip(e.ins, ins):
            if d == PARTIAL:
              self.comm("all-reduce", _nbytes(self.prog.avals[a]), count)
              dims[a] = None
          ins = [dims.get(a) if a is not None else None for a in e.ins]
          out_dims, peak = self.eqn(e, ins, count, dims)
      else:
        out_dims, peak = self.eqn(e, ins, count, dims)
      inner_peak.append(peak)
      mask = 0
      for a in e.ins:
        if a is not None:
          mask |= self.deps.get(a, 0)
      for o in e.outs:
        self.deps[o] = mask
      fusible = e.name in _FUSIBLE
      for o, d in zip(e.outs, out_dims):
        dims[o] = d
        producer[o] = e
        uses = consumers.get(o, [])
        if not fusible or o in out_set or any(c.name not in _FUSIBLE and c.name not in _REDUCTIONS for c in uses):
          materialized.add(o)
    if top and self.out_hints:
      for o, d in zip(outs, self.out_hints):
        if o is not None and d is not None and dims.get(o) is None and d < len(self.shape(o)):
          dims[o] = d
      self.out_hints = []
    self.shard_backward(eqns, dims, consumers, out_set)
    # Fused kernels: a materialized value made by a fusible op or a reduction reads the
    # materialized values it depends on through fusible producers.
    for e in eqns:
      if e.name not in _FUSIBLE and e.name not in _REDUCTIONS:
        continue
      for o in e.outs:
        if o not in materialized:
          continue
        seen, stack, read = set(), list(e.ins), 0
        while stack:
          a = stack.pop()
          if a is None or a in seen:
            continue
          seen.add(a)
          if a in materialized or a not in producer:
            read += self.size(a, dims)
          else:
            stack.extend(producer[a].ins)
        self.kernel(0, read + self.size(o, dims), count, e.att)
    # Liveness of the materialized values created here, in equation order.
    last_use: dict[int, int] = {}
    for i, e in enumerate(eqns):
      for a in e.ins:
        if a is not None:
          last_use[a] = i
    frees: dict[int, list] = {}
    for a, i in last_use.items():
      if a in producer and a in materialized and a not in out_set:
        frees.setdefault(i, []).append(a)
    live = peak = 0
    for i, e in enumerate(eqns):
      created = 0
      for o in e.outs:
        if o in materialized and (o in last_use or o in out_set):
          b = self.size(o, dims)
          created += b
          if b > self.largest[0]:
            self.largest = (b, f"{e.name} -> {self.prog.avals[o].str_short()}")
      peak = max(peak, live + inner_peak[i] + created)
      live += created
      for a in frees.get(i, []):
        live -= self.size(a, dims)
    for o in outs:  # a partial sum leaving the function is reduced there
      if o is not None and dims.get(o) == PARTIAL:
        self.comm("all-reduce", _nbytes(self.prog.avals[o]), count)
        dims[o] = None
    return outs, [dims.get(o) if o is not None else None for o in outs], peak

  def shard_backward(self, eqns, dims, consumers, out_set) -> None:
    """GSPMD shards a value made without a sharded dim (a broadcast, a one-hot of the labels)
    like the sharded values it is combined with elementwise: its bytes per device are a
    share. Walks the equations backwards so that chains of such values follow."""
    if self.tp == 1:
      return
    scatters = ("scatter-add", "scatter_add", "scatter")
    for e in reversed(eqns):
      if e.name not in _FUSIBLE and e.name not in scatters:
        continue
      for o in e.outs:
        if dims.get(o) is not None or o in out_set or o not in consumers:
          continue
        shape, found = self.shape(o), None
        for c in consumers[o]:
          if c.name in scatters and c.ins[0] == o and isinstance(dims.get(c.outs[0]), int):
            found = dims[c.outs[0]] if found in (None, dims[c.outs[0]]) else -1
            continue  # the buffer a sharded scatter updates is sharded like its result
          if c.name not in _ELEMENTWISE:
            found = None
            break
          other = [dims.get(a) for a in c.ins if a is not None and a != o and isinstance(dims.get(a), int)
                   and len(self.shape(a)) == len(shape)]
          other += [dims.get(x) for x in c.outs if isinstance(dims.get(x), int)]
          if not other or (found is not None and other[0] != found):
            found = None
            break
          found = other[0]
        if found is not None and 0 <= found < len(shape):
          dims[o] = found

  def keeps_partial(self, e: _Eqn, ins) -> bool:
    """Whether an op on partial sums gives a partial sum (it is linear in them)."""
    if e.name not in _LINEAR:
      return False
    partial = [d == PARTIAL for a, d in zip(e.ins, ins) if a is not None]
    if e.name in ("mul", "div"):  # linear in one partial factor (the numerator) times a replicated one
      return sum(partial) == 1 and (e.name == "mul" or partial[0]) and all(d is None or d == PARTIAL for d in ins)
    return all(partial)

  def eqn(self, e: _Eqn, ins, count, dims) -> tuple[list, int]:
    name, p = e.name, e.params
    n = len(e.outs)
    if name in ("scan", "while", "cond") and e.att and not self.att:
      self.att = e.att  # its body runs under the scope too
      try:
        return self.eqn(e, ins, count, dims)
      finally:
        self.att = False
    if name == "scan":
      nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
      inner = list(ins[:nc + nk]) + [(d - 1 if d else None) for d in ins[nc + nk:]]
      _, outs, peak = self.walk(p["jaxpr"].jaxpr, inner, count * length)
      return [outs[j] if j < nk else (outs[j] + 1 if outs[j] is not None else None)
              for j in range(len(outs))], peak
    if name == "while":
      cc = p["cond_nconsts"]
      _, outs, peak = self.walk(p["body_jaxpr"].jaxpr, ins[cc:], count)  # trip count unknown: once
      return outs, peak
    if name == "cond":
      best = None
      for br in p["branches"]:
        sub = _Walker(self.tp, self.prog)
        sub.att = self.att
        _, outs, peak = sub.walk(br.jaxpr, ins[1:], count)
        cost = sub.flops + sum(k[1] * k[2] for k in sub.kernels)
        if best is None or cost > best[0]:
          best = (cost, sub, outs, peak)
      self.merge(best[1])
      return best[2], best[3]
    if name == "dot_general":
      return [self.dot(e, ins, count, dims)], 0
    if name == "conv_general_dilated":
      out = e.outs[0]
      rhs = self.shape(e.ins[1])
      o = p["dimension_numbers"].rhs_spec[0] if p.get("dimension_numbers") is not None else 0
      fl = 2.0 * math.prod(self.shape(out)) * math.prod(rhs) / max(rhs[o], 1) / p.get("feature_group_count", 1)
      sharded = self.tp > 1 and any(d is not None for d in ins)
      fl = fl / self.tp if sharded else fl
      self.flops += fl * count
      self.kernel(fl, sum(self.size(a, dims) for a in e.ins) + _nbytes(self.prog.avals[out]) //
                  (self.tp if sharded else 1), count, e.att)
      return [None], 0
    tagged = [(i, d) for i, d in enumerate(ins) if d is not None]
    if not tagged or self.tp == 1:
      return [None] * n, 0
    i0, d0 = tagged[0]
    in_shape = self.shape(e.ins[i0])
    out_shape = self.shape(e.outs[0]) if n else ()
    out_bytes = sum(_nbytes(self.prog.avals[o]) for o in e.outs)
    if name in _ELEMENTWISE and len(in_shape) == len(out_shape):
      return [d0] * n, 0
    if name in _REDUCTIONS:
      axes = tuple(p.get("axes", ()))
      if d0 in axes:
        if name == "reduce_sum":
          return [PARTIAL] * n, 0
        self.comm("all-reduce", out_bytes, count)
        return [None] * n, 0
      return [d0 - sum(a < d0 for a in axes)] * n, 0
    if name == "gather" and i0 == 0:
      # a lookup in a table sharded along a gathered dim: masked local lookups, then a sum
      return [PARTIAL] * n, 0
    movable = name in _FUSIBLE or name.startswith("cum") or name == "sort"
    moved = _move(name, p, in_shape, out_shape, d0) if movable else None
    if moved is not None and all(d == d0 and len(self.shape(e.ins[i])) == len(in_shape) for i, d in tagged):
      return [moved] * n, 0
    for i, _ in tagged:  # acts along the sharded dim: gather the operand first
      self.comm("all-gather", _nbytes(self.prog.avals[e.ins[i]]), count)
    return [None] * n, 0

  def dot(self, e: _Eqn, ins, count, dims):
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    lhs, rhs = e.ins
    ls, rs = self.shape(lhs), self.shape(rhs)
    out = e.outs[0]
    k = math.prod(ls[d] for d in lc)
    flops = 2.0 * math.prod(self.shape(out)) * k
    dl, dr = ins
    free_l = [d for d in range(len(ls)) if d not in lc and d not in lb]
    free_r = [d for d in range(len(rs)) if d not in rc and d not in rb]
    out_dim, reduce = None, False
    if self.tp > 1:
      for side, d in ((0, dl), (1, dr)):
        if d is None:
          continue
        con, bat, free = (lc, lb, free_l) if side == 0 else (rc, rb, free_r)
        if d in con:
          reduce = True
        elif d in bat:
          out_dim = list(bat).index(d)
        else:
          out_dim = len(lb) + (len(free_l) if side else 0) + free.index(d)
      if reduce:
        out_dim = None
    sharded = self.tp > 1 and (dl is not None or dr is not None)
    if sharded:
      flops /= self.tp
    self.flops += flops * count
    out_b = _nbytes(self.prog.avals[out]) // (self.tp if out_dim is not None and self.tp > 1 else 1)
    self.kernel(flops, self.size(lhs, dims) + self.size(rhs, dims) + out_b, count, e.att)
    return PARTIAL if reduce else out_dim

  def merge(self, other: "_Walker"):
    self.flops += other.flops
    self.attention += [(i + len(self.kernels), c) for i, c in other.attention]
    self.kernels += other.kernels
    self.comms += other.comms
    if other.largest[0] > self.largest[0]:
      self.largest = other.largest


def analyze(closed: ClosedJaxpr, in_dims: Sequence, tp: int = 1, groups: Sequence[int] | None = None,
            out_hints: Sequence | None = None) -> JaxprCost:
  """Per-device costs of one call of `closed` (module doc).

  Args:
    closed: the function's jaxpr (`jax.make_jaxpr(f)(*args)`).
    in_dims: per input (flattened), the dim sharded over 'tensor' or None.
    tp: the size of the 'tensor' axis.
    groups: per input, a group number (0-30); `out_deps` then says which groups each output
      depends on (default: every input its own group, up to 31).
    out_hints: per output (or a prefix of them), the dim the caller shards it on over
      'tensor' (a gradient constrained like its parameter), or None; what makes it is then
      sharded alike (GSPMD propagates shardings backwards too).

  Example:
    >>> c = analyze(jax.make_jaxpr(f)(x, w), [None, 1], tp=4)
    >>> c.flops, c.peak_bytes
  """
  jaxpr = closed.jaxpr
  if len(in_dims) != len(jaxpr.invars):
    raise ValueError(f"analyze: in_dims has {len(in_dims)} entries for a jaxpr of {len(jaxpr.invars)} inputs.")
  prog = _Program()
  w = _Walker(tp, prog)
  args = [prog.new(v.aval) for v in jaxpr.invars]
  groups = groups if groups is not None else [min(i, 30) for i in range(len(args))]
  for a, g in zip(args, groups):
    w.deps[a] = 1 << g
  w.out_hints = list(out_hints or [])
  outs, out_dims, peak = w.walk(jaxpr, list(in_dims), 1, args)
  arg_set = set(args)
  out_b = []
  for o, d in zip(outs, out_dims):
    b = 0 if o is None else _nbytes(prog.avals[o])
    out_b.append(b // tp if d is not None and tp > 1 else b)
  sources = [args.index(o) if o is not None and o in arg_set else -1 for o in outs]
  deps = tuple(w.deps.get(o, 0) if o is not None else 0 for o in outs)
  seen, repeats = set(), []
  for o in outs:
    repeats.append(o is not None and o in seen)
    seen.add(o)
  return JaxprCost(w.flops, tuple(w.kernels), tuple(w.comms), peak, w.largest, tuple(out_b),
                   tuple(sources), tuple(out_dims), deps, tuple(repeats),
                   tuple(i for i, _ in w.attention), tuple(c for _, c in w.attention))
