"""`p.grad` of a parameter ap-xla trains: a read-only view of the accumulated gradient.

The gradients live in the compiled program (sharded like the plan's parameters). Reading
`p.grad` gives a `GradView`: a tensor with the parameter's shape, dtype and device that holds
no data until something reads its values; then it is fetched from the accumulator (the sum
of the tensor's copies for tied weights, after any pending clipping). So code that checks
`p.grad is not None` or `isinstance(p.grad, DTensor)`, logs a gradient norm, or copies
gradients out gets what torch would give, and costs nothing when it only looks at metadata.

Writing through it is refused with `UnsupportedUsageError` (an in-place op on it, `out=` it,
`p.grad = ...`): the edit could not reach the compiled program. Gradient clipping with
`torch.nn.utils.clip_grad_norm_` / `clip_grad_value_` is compiled into the update instead
(`clipping.py`). A view read before `zero_grad()` cleared the accumulator refuses to read.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map

from ap_xla.torch_frontend.errors import UnsupportedUsageError

# Tensor methods that read metadata only: answered without fetching the values.
_METADATA = {"size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
             "get_device", "ndimension", "is_contiguous", "__len__", "type"}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__ipow__",
                    "__imod__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                    "__setitem__", "__set__"}

WRITE_MESSAGE = (
    "ap-xla trains this model: {name}.grad is a read-only view of the gradient accumulated inside "
    "the compiled XLA program, and {what} cannot change it there. Gradient clipping with "
    "torch.nn.utils.clip_grad_norm_ / clip_grad_value_ (also through accelerate and the HF Trainer) "
    "is compiled into the update: call it by that name (a copy imported before ap-xla was enabled "
    "is torch's own). Scale the loss instead of the gradients, or run the script without "
    "enable_advanced_parallelization().")


class GradView(torch.Tensor):
  """The gradient of one parameter as the session holds it (see the module docstring).

  Args:
    like: the parameter (shape, dtype, device).
    name: its torch name (for messages).
    read: `() -> torch.Tensor`, the current values (raises if they were cleared since).
  """

  @staticmethod
  def __new__(cls, like: torch.Tensor, name: str, read: Callable[[], torch.Tensor]):
    with torch._C.DisableTorchFunctionSubclass():
      shape, dtype, device = like.shape, like.dtype, like.device
    view = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
    view._ap_name, view._ap_read = name, read
    return view

  def materialize(self) -> torch.Tensor:
    return self._ap_read()

  def __repr__(self, *, tensor_contents=None):
    return f"GradView({self._ap_name}, {self.materialize()!r})"

  @classmethod
  def __torch_function__(cls, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    name = getattr(func, "__name__", "")
    if name == "__get__":
      prop = getattr(getattr(func, "__self__", None), "__name__", "")
      if prop == "data":
        return args[0]  # `.data` of the view is the view: writes through it are refused too
      if prop != "grad":  # shape, dtype, device, requires_grad, ...: the wrapper has them
        with torch._C.DisableTorchFunctionSubclass():
          return func(*args, **kwargs)
    if name in _METADATA and not (name == "type" and len(args) > 1):
      with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)
    target = _written(name, args, kwargs)
    if target is not None:
      raise UnsupportedUsageError(WRITE_MESSAGE.format(name=target._ap_name, what=f"{name}()"))
    args, kwargs = tree_map(_values, (args, kwargs))
    with torch._C.DisableTorchFunctionSubclass():
      return func(*args, **kwargs)

  @classmethod
  def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    if func._schema.is_mutable and any(isinstance(a, GradView) for a in _first(args)):
      view = next(a for a in _first(args) if isinstance(a, GradView))
      raise UnsupportedUsageError(WRITE_MESSAGE.format(name=view._ap_name, what=str(func)))
    return func(*tree_map(_values, args), **tree_map(_values, kwargs))


def _values(x):
  return x.materialize() if isinstance(x, GradView) else x


def _first(args) -> list:
  if not args:
    return []
  a = args[0]
  return list(a) if isinstance(a, (list, tuple)) else [a]


def _written(name: str, args, kwargs) -> GradView | None:
  """The view an operation would write to (in-place on its first argument, or `out=`), if any."""
  inplace = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
  if inplace:
    for a in _first(args):
      if isinstance(a, GradView):
        return a
  out = kwargs.get("out")
  for a in (out if isinstance(out, (list, tuple)) else [out]):
    if isinstance(a, GradView):
      return a
  return None
