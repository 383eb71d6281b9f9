"""Gradient clipping compiled into the update: `torch.nn.utils.clip_grad_norm_` and friends.

While the front end is installed, `torch.nn.utils.clip_grad_norm_`, `clip_grad_value_` and
`clip_grads_with_norm_` (also as `torch.nn.utils.clip_grad.*`, where accelerate and the HF
Trainer find them) are these functions. For parameters of a model ap-xla trains:

  * `clip_grad_norm_(params, max_norm, norm_type)` computes the total norm of their
    gradients on the plan's devices (one jitted reduction over every device's shards; a tied
    tensor counts once, with the sum of its copies' gradients), returns it as a torch scalar
    (`.item()` reads it) and multiplies the gradients by torch's clip coefficient,
    `min(max_norm / (total_norm + 1e-6), 1)`, inside the next compiled update (fused, no
    extra pass over the gradients);
  * `clip_grad_value_(params, v)` clamps them to [-v, v] (one jitted pass over the shards);
  * parameters torch trains (not taken over) in the same call are clipped by torch's own
    functions, with one total norm over all of them, as torch computes it.

`error_if_nonfinite=True` raises torch's error for a non-finite norm. `foreach` picks torch
kernels and is ignored for the compiled part.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ap_xla.torch_frontend import sync
from ap_xla.torch_frontend.patching import Patches

PyTree = Any

_ORIGINALS: dict = {}


# -- JAX side: norms and clamps over the accumulator, by torch name ---------------------------

class GradIndex:
  """Where each torch name's gradient is in an accumulator structured like `param_names`.

  Args:
    names: the `param_names` tree (a leaf: a torch name, or a tuple of L names for a stacked
      block leaf).
  """

  def __init__(self, names: PyTree):
    self.leaves = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, (str, tuple)))
    self.where: dict[str, list[tuple[int, int | None]]] = {}
    for i, leaf in enumerate(self.leaves):
      for row, n in (enumerate(leaf) if isinstance(leaf, tuple) else [(None, leaf)]):
        self.where.setdefault(n, []).append((i, row))
    self.tied = {n for n, occ in self.where.items() if len(occ) > 1}

  def gradient(self, flat: list, name: str):
    """The gradient of `name` from the flat accumulator leaves (tied copies summed)."""
    parts = [flat[i] if row is None else flat[i][row] for i, row in self.where[name]]
    return parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])


def _reduce(g, p: float):
  g = jnp.abs(g.astype(jnp.float32))
  return jnp.max(g) if math.isinf(p) else jnp.sum(g ** p) if p != 2 else jnp.sum(g * g)


def grad_norm_fn(index: GradIndex, selected: frozenset, p: float):
  """`fn(acc, scale) -> total p-norm` of the selected names' gradients (jitted)."""
  rows = []
  for i, leaf in enumerate(index.leaves):
    names = leaf if isinstance(leaf, tuple) else (leaf,)
    mask = np.array([n in selected and n not in index.tied for n in names])
    if mask.any():
      rows.append((i, isinstance(leaf, tuple), mask))
  tied = sorted(index.tied & selected)

  def fn(acc, scale):
    flat = jax.tree.leaves(acc)
    parts = []
    for i, stacked, mask in rows:
      g = flat[i]
      if stacked:
        per_row = jax.vmap(lambda x: _reduce(x, p))(g)
        parts.append(jnp.max(jnp.where(mask, per_row, 0.0)) if math.isinf(p) else jnp.sum(per_row * mask))
      else:
        parts.append(_reduce(g, p))
    parts += [_reduce(index.gradient(flat, n), p) for n in tied]
    if not parts:
      return jnp.float32(0.0)
    total = jnp.max(jnp.stack(parts)) if math.isinf(p) else jnp.sum(jnp.stack(parts)) ** (1.0 / p)
    return total * jnp.abs(scale)
  return jax.jit(fn)


def _masks(index: GradIndex, selected: frozenset) -> list:
  """Per accumulator leaf: (stacked, bool mask over its names) of the selected, untied names."""
  out = []
  for leaf in index.leaves:
    names = leaf if isinstance(leaf, tuple) else (leaf,)
    out.append((isinstance(leaf, tuple), np.array([n in selected and n not in index.tied for n in names])))
  return out


def _where(stacked: bool, mask: np.ndarray, new, old):
  if stacked:
    return jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
  return new if mask[0] else old


def scale_fn(index: GradIndex, selected: frozenset, shardings):
  """`fn(acc, coef) -> acc` with the selected names' gradients multiplied by `coef` (all copies
  of a tied tensor: the update sums them)."""
  rows = _masks(index, selected)
  tied_leaves = {i for n in index.tied & selected for i, _ in index.where[n]}

  def fn(acc, coef):
    flat, treedef = jax.tree.flatten(acc)
    out = [g * coef.astype(g.dtype) if i in tied_leaves else _where(stacked, mask, g * coef.astype(g.dtype), g)
           for i, (g, (stacked, mask)) in enumerate(zip(flat, rows))]
    return jax.tree.unflatten(treedef, out)
  return jax.jit(fn, out_shardings=shardings, donate_argnums=(0,))


def clamp_fn(index: GradIndex, selected: frozenset, shardings):
  """`fn(acc, scale, value) -> acc` with the selected gradients (times scale) clamped to
  [-value, value]; a tied tensor's summed gradient is clamped and kept in its first copy."""
  rows = _masks(index, selected)
  tied = sorted(index.tied & selected)

  def fn(acc, scale, value):
    flat, treedef = jax.tree.flatten(acc)
    out = []
    for g, (stacked, mask) in zip(flat, rows):
      g = g * scale.astype(g.dtype)
      out.append(_where(stacked, mask, jnp.clip(g, -value.astype(g.dtype), value.astype(g.dtype)), g))
    for n in tied:
      total = index.gradient([x * scale.astype(x.dtype) for x in flat], n)
      (first_i, _), *others = index.where[n]
      out[first_i] = jnp.clip(total, -value.astype(total.dtype), value.astype(total.dtype))
      for i, _ in others:
        out[i] = jnp.zeros_like(out[i])  # the update sums a tied tensor's copies again
    return jax.tree.unflatten(treedef, out)
  return jax.jit(fn, out_shardings=shardings, donate_argnums=(0,))


# -- torch side: the replacements --------------------------------------------------------------

def _split(parameters) -> tuple[dict, list]:
  """Parameters by the session that trains them ({mirror: [names]}) and the rest."""
  if isinstance(parameters, torch.Tensor):
    parameters = [parameters]
  ours, rest = {}, []
  for p in parameters:
    mirror = sync.owner(p)
    if mirror is None:
      rest.append(p)
    else:
      ours.setdefault(mirror, []).append(mirror.name_of(p))
  return ours, rest


def _torch_norm(params, norm_type: float, foreach) -> torch.Tensor | None:
  grads = [p.grad for p in params if p.grad is not None]
  if not grads:
    return None
  return torch.nn.utils.get_total_norm(grads, norm_type, False, foreach)


def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> torch.Tensor:
  """torch's `clip_grad_norm_`, with the gradients of taken-over models clipped in their update."""
  ours, rest = _split(parameters)
  if not ours:
    return _ORIGINALS["clip_grad_norm_"](rest, max_norm, norm_type, error_if_nonfinite, foreach)
  p = float(norm_type)
  if not (p > 0 or math.isinf(p)) or math.isnan(p):
    raise ValueError(f"clip_grad_norm_: norm_type must be a positive number or inf, got {norm_type!r}.")
  norms = [float(m.session.grads.norm(frozenset(names), p)) for m, names in ours.items()]
  plain = _torch_norm(rest, p, foreach)
  if plain is not None:
    norms.append(float(plain))
  total = max(norms) if math.isinf(p) else sum(n ** p for n in norms) ** (1.0 / p)
  total_t = torch.tensor(total, dtype=torch.float32)
  if error_if_nonfinite and not math.isfinite(total):
    raise RuntimeError(
        f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
        "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
        "`error_if_nonfinite=False`")
  _scale_all(ours, rest, max_norm, total_t, foreach)
  return total_t


def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor, foreach=None) -> None:
  """torch's `clip_grads_with_norm_`: scales every gradient by min(max_norm / (total_norm + 1e-6), 1)."""
  ours, rest = _split(parameters)
  _scale_all(ours, rest, max_norm, torch.as_tensor(total_norm, dtype=torch.float32), foreach)


def _scale_all(ours: dict, rest: list, max_norm: float, total: torch.Tensor, foreach) -> None:
  coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
  for mirror, names in ours.items():
    mirror.session.grads.scale_by(frozenset(names), float(coef))
  if rest:
    _ORIGINALS["clip_grads_with_norm_"](rest, max_norm, total, foreach)


def clip_grad_value_(parameters, clip_value: float, foreach: bool | None = None) -> None:
  """torch's `clip_grad_value_`, with the gradients of taken-over models clamped on their devices."""
  ours, rest = _split(parameters)
  for mirror, names in ours.items():
    mirror.session.grads.clamp(frozenset(names), float(clip_value))
  if rest:
    _ORIGINALS["clip_grad_value_"](rest, clip_value, foreach)


REPLACEMENTS = {"clip_grad_norm_": clip_grad_norm_, "clip_grad_value_": clip_grad_value_,
                "clip_grads_with_norm_": clip_grads_with_norm_}


def install(patches: Patches) -> None:
  """Replaces the three functions in `torch.nn.utils` (and `torch.nn.utils.clip_grad`, where
  torch defines them, some under a leading underscore)."""
  import torch.nn.utils.clip_grad as clip_mod
  for name, fn in REPLACEMENTS.items():
    _ORIGINALS.setdefault(name, patches.original(torch.nn.utils, name))
    patches.set(torch.nn.utils, name, fn)
    if name in clip_mod.__dict__:
      patches.set(clip_mod, name, fn)
