"""The gradient accumulator of a taken-over model: what torch keeps in the parameters' `.grad`.

`loss.backward()` adds a forward's gradients (times the backward's grad_output) here,
`zero_grad()` clears them, `p.grad` reads them (`grads.GradView`), and clipping acts on them
(`clipping.py`): a clip of the whole model's norm only records its coefficient, which the
next compiled update multiplies in (`pending_scale`); everything else that changes the
gradients folds that coefficient in first.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import torch

from ap_xla.torch_frontend import clipping
from ap_xla.torch_frontend import outputs as out_lib
from ap_xla.torch_frontend.errors import UnsupportedUsageError
from ap_xla.torch_frontend.grads import GradView

PyTree = Any


class Accumulator:
  """Accumulated gradients on the current phase's devices.

  Args:
    names: the trainable part of the `param_names` tree, None at frozen leaves (the
      accumulator has its structure; frozen parameters have no gradient: `p.grad` is None).
    phase: `() -> Phase`, the phase whose shardings and jitted pieces apply now.
    dtype_of: torch name -> the parameter's dtype (what `p.grad` has).
  """

  def __init__(self, names: PyTree, phase: Callable, dtype_of: Callable[[str], torch.dtype]):
    self.index = clipping.GradIndex(names)
    self._phase, self._dtype_of = phase, dtype_of
    self.grads = None   # None: cleared (torch's grads are None)
    self.scale = None   # a pending clip coefficient (None: 1)
    self.epoch = 0      # bumped when the gradients are cleared
    self._fns: dict = {}

  @property
  def pending_scale(self) -> np.float32:
    """The coefficient the next update multiplies the gradients by."""
    return np.float32(1.0 if self.scale is None else self.scale)

  def place(self, shardings) -> None:
    if self.grads is not None:
      self.grads = jax.device_put(self.grads, shardings)

  def add(self, grads: PyTree, s: float) -> None:
    """`grads * s` added (what `loss.backward()` does with a grad_output of `s`)."""
    phase = self._phase()
    self._fold()
    scale = np.float32(s)
    if self.grads is None:
      self.grads = grads if s == 1.0 else phase.scale(grads, scale)
    else:
      self.grads = phase.accumulate(self.grads, grads, scale)

  def clear(self, set_to_none: bool, params: PyTree) -> None:
    """`zero_grad()`: None, or zeros like `params`."""
    self.grads = None if set_to_none else self._phase().zeros(params)
    self.scale = None
    self.epoch += 1

  def _fold(self) -> None:
    if self.scale is not None and self.grads is not None:
      self.grads = self._phase().scale(self.grads, np.float32(self.scale))
    self.scale = None

  # -- p.grad ------------------------------------------------------------------------------
  def view(self, param: torch.nn.Parameter, name: str) -> GradView | None:
    """`p.grad`: a view of `name`'s gradient, or None without gradients."""
    if self.grads is None or name not in self.index.where:
      return None
    epoch = self.epoch
    return GradView(param, name, lambda: self.read(name, epoch))

  def read(self, name: str, epoch: int) -> torch.Tensor:
    """The gradient of `name` as a torch tensor (what torch's `.grad` would hold now)."""
    if epoch != self.epoch or self.grads is None:
      raise UnsupportedUsageError(
          f"this {name}.grad was read before the gradients were cleared (zero_grad()); ap-xla does "
          "not keep cleared gradients. Read p.grad again after the next backward.")
    g = self.index.gradient(jax.tree.leaves(self.grads), name)
    if self.scale is not None:
      g = g * self.scale
    return out_lib.to_torch(g).to(self._dtype_of(name))

  # -- clipping ----------------------------------------------------------------------------
  def _fn(self, kind: str, selected: frozenset, arg=None):
    phase = self._phase()
    key = (kind, selected, arg, id(phase))
    if key not in self._fns:
      if kind == "norm":
        self._fns[key] = clipping.grad_norm_fn(self.index, selected, arg)
      else:
        make = clipping.clamp_fn if kind == "clamp" else clipping.scale_fn
        self._fns[key] = make(self.index, selected, phase.grad_shardings)
    return self._fns[key]

  def _selected(self, names: frozenset) -> frozenset:
    return frozenset(names & self.index.where.keys())

  def norm(self, names: frozenset, p: float) -> float:
    """The p-norm of the gradients of the torch names `names` (0 without gradients)."""
    if self.grads is None:
      return 0.0
    return float(self._fn("norm", self._selected(names), p)(self.grads, self.pending_scale))

  def scale_by(self, names: frozenset, coef: float) -> None:
    """Multiplies the gradients of `names` by `coef`: for all of them, inside the next update
    (fused with it); for some, now."""
    if self.grads is None or coef == 1.0:
      return
    selected = self._selected(names)
    if selected == frozenset(self.index.where):
      self.scale = (1.0 if self.scale is None else self.scale) * coef
    else:
      self.grads = self._fn("scale", selected)(self.grads, np.float32(coef))

  def clamp(self, names: frozenset, value: float) -> None:
    """Clamps the gradients of `names` to [-value, value]."""
    if self.grads is None:
      return
    self.grads = self._fn("clamp", self._selected(names))(self.grads, self.pending_scale, np.float32(value))
    self.scale = None
