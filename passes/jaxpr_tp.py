"""Which dim of each value a tensor-parallel plan shards over 'tensor', followed through a jaxpr.

The dims follow the dataflow the way GSPMD shards Megatron blocks: elementwise ops keep
them, shape ops move them, a matmul keeps a sharded free or batch dim; a matmul contracting
a sharded dim (row parallel), a reduction over it, or a gather from a table sharded along
it leaves its result a partial sum (`PARTIAL`), reduced by an all-reduce over 'tensor' where
a non-linear op first needs it; any other op touching a sharded dim gathers its operand
first. The walker of `passes.jaxpr_cost` applies these rules per equation of the IR of
`passes.jaxpr_ir` and charges the collectives they name.
"""
from __future__ import annotations

import math
from typing import Callable

from passes.jaxpr_ir import ELEMENTWISE, FUSIBLE, REDUCTIONS, Eqn, nbytes

# A value summed over 'tensor' but not yet reduced (after a matmul contracting a sharded dim):
# GSPMD reduces it where a non-linear op first needs it, so adds of partial sums (q, k and v's
# input gradients) cost one all-reduce, as XLA's all-reduce reassociation makes them.
PARTIAL = "partial"
LINEAR = {"add", "add_any", "sub", "neg", "convert_element_type", "reshape", "transpose", "broadcast_in_dim",
          "squeeze", "expand_dims", "copy", "copy_p", "reduce_sum", "mul", "div"}
SCATTERS = ("scatter-add", "scatter_add", "scatter")


def reshape_dim(in_shape, out_shape, dim):
  """The output dim a reshape moves `dim` to (the one at the same outer offset), or None."""
  outer = math.prod(in_shape[:dim])
  for j, s in enumerate(out_shape):
    if math.prod(out_shape[:j]) == outer and s > 1:
      return j if s % in_shape[dim] == 0 or in_shape[dim] % s == 0 else None
  return None


def move(name, p, in_shape, out_shape, d):
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
    return reshape_dim(in_shape, out_shape, d)
  if name in ("slice", "dynamic_slice", "pad", "rev"):
    return d if in_shape[d] == out_shape[d] else None
  if name in ("concatenate", "split"):
    return None if p.get("dimension", p.get("axis")) == d else d
  if name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort"):
    return None if p.get("axis", p.get("dimension")) == d else d
  return None


def keeps_partial(e: Eqn, ins) -> bool:
  """Whether an op on partial sums gives a partial sum (it is linear in them)."""
  if e.name not in LINEAR:
    return False
  partial = [d == PARTIAL for a, d in zip(e.ins, ins) if a is not None]
  if e.name in ("mul", "div"):  # linear in one partial factor (the numerator) times a replicated one
    return sum(partial) == 1 and (e.name == "mul" or partial[0]) and all(d is None or d == PARTIAL for d in ins)
  return all(partial)


def op_dims(e: Eqn, ins, avals) -> tuple[list, list]:
  """(dims of `e`'s outputs, collectives it needs as (kind, full bytes)) for an op other than a
  loop, a matmul or a convolution, given its inputs' dims `ins` (tp > 1); `avals` indexes ids."""
  name, p = e.name, e.params
  n = len(e.outs)
  tagged = [(i, d) for i, d in enumerate(ins) if d is not None]
  if not tagged:
    return [None] * n, []
  shape = lambda i: tuple(getattr(avals[i], "shape", ()))
  i0, d0 = tagged[0]
  in_shape = shape(e.ins[i0])
  out_shape = shape(e.outs[0]) if n else ()
  out_bytes = sum(nbytes(avals[o]) for o in e.outs)
  if name in ELEMENTWISE and len(in_shape) == len(out_shape):
    return [d0] * n, []
  if name in REDUCTIONS:
    axes = tuple(p.get("axes", ()))
    if d0 in axes:
      if name == "reduce_sum":
        return [PARTIAL] * n, []
      return [None] * n, [("all-reduce", out_bytes)]
    return [d0 - sum(a < d0 for a in axes)] * n, []
  if name == "gather" and i0 == 0:
    # a lookup in a table sharded along a gathered dim: masked local lookups, then a sum
    return [PARTIAL] * n, []
  movable = name in FUSIBLE or name.startswith("cum") or name == "sort"
  moved = move(name, p, in_shape, out_shape, d0) if movable else None
  if moved is not None and all(d == d0 and len(shape(e.ins[i])) == len(in_shape) for i, d in tagged):
    return [moved] * n, []
  # acts along the sharded dim: gather the operand first
  return [None] * n, [("all-gather", nbytes(avals[e.ins[i]])) for i, _ in tagged]


def dot_dims(dimension_numbers, lhs_rank: int, rhs_rank: int, dl, dr) -> tuple:
  """(output dim sharded over 'tensor' or None, whether the result is a partial sum) of a
  dot_general whose operands are sharded on dims `dl` and `dr` (None: replicated)."""
  (lc, rc), (lb, rb) = dimension_numbers
  free_l = [d for d in range(lhs_rank) if d not in lc and d not in lb]
  free_r = [d for d in range(rhs_rank) if d not in rc and d not in rb]
  out_dim, reduce = None, False
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
  return (None, True) if reduce else (out_dim, False)


def shard_backward(eqns, dims: dict, consumers: dict, out_set, shape: Callable) -> None:
  """GSPMD shards a value made without a sharded dim (a broadcast, a one-hot of the labels)
  like the sharded values it is combined with elementwise: its bytes per device are a
  share. Walks the equations backwards so that chains of such values follow; updates `dims`."""
  for e in reversed(eqns):
    if e.name not in FUSIBLE and e.name not in SCATTERS:
      continue
    for o in e.outs:
      if dims.get(o) is not None or o in out_set or o not in consumers:
        continue
      shp, found = shape(o), None
      for c in consumers[o]:
        if c.name in SCATTERS and c.ins[0] == o and isinstance(dims.get(c.outs[0]), int):
          found = dims[c.outs[0]] if found in (None, dims[c.outs[0]]) else -1
          continue  # the buffer a sharded scatter updates is sharded like its result
        if c.name not in ELEMENTWISE:
          found = None
          break
        other = [dims.get(a) for a in c.ins if a is not None and a != o and isinstance(dims.get(a), int)
                 and len(shape(a)) == len(shp)]
        other += [dims.get(x) for x in c.outs if isinstance(dims.get(x), int)]
        if not other or (found is not None and other[0] != found):
          found = None
          break
        found = other[0]
      if found is not None and 0 <= found < len(shp):
        dims[o] = found
