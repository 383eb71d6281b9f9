"""Partition specs of a plan: parameters, optimizer state and batch on the (stage, data, tensor) mesh."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from passes.compat import auto_mesh
from passes.plan import DATA, STAGE, TENSOR, Plan
from passes.program import BLOCKS, Program

PyTree = Any


def make_mesh(plan: Plan, devices) -> Mesh:
  """The (stage, data, tensor) mesh of a plan over the first `plan.num_devices` devices; under
  HSDP (stage, replica, data, tensor), each FSDP group `plan.fsdp_group` consecutive data ranks."""
  devices = list(devices)
  if len(devices) < plan.num_devices:
    raise ValueError(f"{plan} needs {plan.num_devices} devices, got {len(devices)}.")
  arr = np.array(devices[:plan.num_devices], dtype=object).reshape(tuple(plan.mesh_shape.values()))
  return auto_mesh(arr, plan.mesh_axes)


def _fsdp_dim(shape, taken: set[int], dp: int, skip_leading: bool) -> int | None:
  """The largest dimension free of other axes that divides by dp (None: keep replicated)."""
  best = None
  for d, n in enumerate(shape):
    if d in taken or (skip_leading and d == 0) or n % dp or n < dp:
      continue
    if best is None or n > shape[best]:
      best = d
  return best


def _leaf_spec(shape, tp_dim: int | None, plan: Plan, stacked: bool) -> P:
  spec = [None] * len(shape)
  taken = set()
  if stacked and plan.pp > 1:
    spec[0] = STAGE
    taken.add(0)
  if tp_dim is not None and plan.tp > 1:
    spec[tp_dim] = TENSOR
    taken.add(tp_dim)
  if plan.fsdp and plan.shard_degree > 1:
    d = _fsdp_dim(shape, taken, plan.shard_degree, skip_leading=stacked)
    if d is not None:
      spec[d] = DATA
  return P(*spec)


def param_specs(program: Program, plan: Plan, tp_dims: PyTree | None) -> PyTree:
  """PartitionSpec per parameter leaf.

  Args:
    program: the program (its params give the shapes).
    plan: the plan.
    tp_dims: pytree like `program.params` with the dim to shard over 'tensor' per leaf (int or
      None), already offset for stacked leaves; None when the plan has no tensor parallelism.
  """
  params = program.params
  if tp_dims is None:
    tp_dims = jax.tree.map(lambda _: None, params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  dims = treedef.flatten_up_to(tp_dims)
  specs = []
  for (path, leaf), tp_dim in zip(flat, dims):
    stacked = program.layers is not None and _key(path[0]) == BLOCKS
    specs.append(_leaf_spec(leaf.shape, tp_dim, plan, stacked))
  return jax.tree_util.tree_unflatten(treedef, specs)


def _key(entry) -> str:
  return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))


def opt_state_specs(opt_state_shapes: PyTree, params: PyTree, pspecs: PyTree) -> PyTree:
  """Specs for the optimizer state: a leaf takes its parameter's spec, matched by path suffix.

  optax states hold parameter-shaped trees (mu, nu, momentum) under their own prefixes, also
  inside `multi_transform`'s masked states, so a state leaf whose path ends with a parameter's
  path and has its shape is sharded like that parameter; the rest (counts) are replicated.
  """
  pflat, _ = jax.tree_util.tree_flatten_with_path(params)
  sflat = jax.tree.leaves(pspecs, is_leaf=lambda x: isinstance(x, P))
  by_path = {tuple(map(_key, path)): (leaf.shape, spec) for (path, leaf), spec in zip(pflat, sflat)}
  lengths = sorted({len(k) for k in by_path}, reverse=True)

  def spec_for(path, leaf):
    keys = tuple(map(_key, path))
    for n in lengths:
      hit = by_path.get(keys[-n:]) if n <= len(keys) else None
      if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
        return hit[1]
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, opt_state_shapes)


def batch_spec(leaf, axes=DATA) -> P:
  """The batch's leading dim over 'data' (over `axes`: under HSDP ('replica', 'data'))."""
  return P(axes, *([None] * (len(leaf.shape) - 1))) if len(leaf.shape) else P()


def batch_specs(batch: PyTree, axes=DATA) -> PyTree:
  return jax.tree.map(lambda x: batch_spec(x, axes), batch)


def largest_shard_group(program: Program, dp: int) -> int:
  """The largest divisor g of dp over which every weight FSDP could split (a leaf with a
  dimension of at least g elements, the layer dim of stacked blocks aside) has a dimension
  divisible by g: the FSDP group that shards all weights when dp itself divides none of their
  dims (e.g. 96 ranks and Llama's dims: 32; the plan is then HSDP over 96 / 32 groups).

  Args:
    program: the program (its params give the shapes).
    dp: the data-parallel degree.
  """
  shapes = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(program.params)[0]:
    stacked = program.layers is not None and _key(path[0]) == BLOCKS
    shapes.append(tuple(leaf.shape)[1:] if stacked else tuple(leaf.shape))

  def ok(g):  # (and some weight does split: not vacuously, with every weight smaller than g)
    return (all(any(n % g == 0 for n in shape) for shape in shapes if any(n >= g for n in shape))
            and any(n % g == 0 for shape in shapes for n in shape))
  return max(g for g in range(1, dp + 1) if dp % g == 0 and ok(g))


def named(mesh: Mesh, specs: PyTree) -> PyTree:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def without_axis(spec: P, axis: str) -> P:
  """The spec with `axis` removed (how FSDP gathers a parameter before use)."""
  out = []
  for s in spec:
    if s == axis:
      out.append(None)
    elif isinstance(s, tuple):
      rest = tuple(a for a in s if a != axis)
      out.append(rest if len(rest) > 1 else (rest[0] if rest else None))
    else:
      out.append(s)
  return P(*out)


def drop_leading(spec: P) -> P:
  """The spec of one block's slice of a stacked leaf."""
  return P(*tuple(spec)[1:])


def num_shards(spec: P, mesh: dict) -> int:
  """How many shards `spec` cuts a value into on a mesh of {axis: size}."""
  n = 1
  for a in tuple(spec):
    for ax in (a if isinstance(a, tuple) else (a,)):
      if ax is not None:
        n *= mesh[ax]
  return n
