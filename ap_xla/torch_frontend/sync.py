"""Keeps the torch parameters of a taken-over model consistent with its JAX training state.

After the takeover the trained values live in JAX. The torch module keeps its parameter
objects; their class is switched to `APParam`, a subclass of `nn.Parameter` that

  * brings the torch values up to date before any torch operation reads them (its
    `__torch_function__`), so `model.state_dict()`, `torch.save`, `copy.deepcopy(model)`,
    `p.norm()` or an eager forward all see the trained weights;
  * answers `p.grad` with a read-only view of the gradient accumulated in JAX (`grads.py`)
    and refuses `p.grad = ...` (see `_GRAD_MESSAGE`);
  * lets in-place edits through (`torch.nn.init.*_(p)`, `p.mul_()`, `load_state_dict`):
    they are noticed by `p._version` (or by a `.data` access) and read back into JAX
    before the next training call. An edit made through a stale alias (a tensor taken
    with `.detach()` before later steps) is refused with an error, never trained on.

`ap_xla.sync_to_torch(model)` does the same update explicitly, for code that reads
parameter storage without a torch operation (e.g. numpy views taken earlier).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ap_xla.torch_frontend.errors import UnsupportedUsageError

log = logging.getLogger("ap_xla")

_local = threading.local()
# Parameter -> the TorchMirror of the session that owns it.
_OWNERS = WeakIdKeyDictionary()

_GRAD_MESSAGE = (
    "ap-xla trains this model: setting `{name}.grad` is not supported. The gradients are "
    "accumulated inside the compiled XLA program (loss.backward() adds them there, "
    "optimizer.zero_grad() or model.zero_grad() clears them) and `{name}.grad` is a read-only view "
    "of them. Clip with torch.nn.utils.clip_grad_norm_ / clip_grad_value_ (compiled into the "
    "update), or run the script without enable_advanced_parallelization().")


@contextlib.contextmanager
def internal():
  """Torch operations inside are ap-xla's own: they do not trigger a sync."""
  prev = getattr(_local, "internal", False)
  _local.internal = True
  try:
    yield
  finally:
    _local.internal = prev


def _is_internal() -> bool:
  return getattr(_local, "internal", False)


def _raw_grad(p: torch.Tensor):
  return torch._C.TensorBase.grad.__get__(p)


def _aliases_storage(func) -> bool:
  """`p.data` (get or set) hands out or replaces storage behind the version counter."""
  owner = getattr(func, "__self__", None)
  return getattr(func, "__name__", "") in ("__get__", "__set__") and getattr(owner, "__name__", "") == "data"


class APParam(torch.nn.Parameter):
  """A parameter whose trained value lives in JAX (see the module docstring)."""

  @property
  def grad(self):
    mirror = _OWNERS.get(self)
    if mirror is None or _is_internal():
      return _raw_grad(self)
    # torch.nn.Module.zero_grad() reads every p.grad first: honour it as zero_grad.
    if mirror.handle_module_zero_grad():
      return None
    return mirror.grad_view(self)

  @grad.setter
  def grad(self, value):
    mirror = _OWNERS.get(self)
    if mirror is None or _is_internal():
      torch._C.TensorBase.grad.__set__(self, value)
      return
    raise UnsupportedUsageError(_GRAD_MESSAGE.format(name=mirror.name_of(self)))

  @classmethod
  def __torch_function__(cls, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    if not _is_internal():
      for mirror in _mirrors_in(args, kwargs):
        mirror.ensure_torch_current()
        if _aliases_storage(func):
          mirror.maybe_edited = True
    with torch._C.DisableTorchFunctionSubclass():
      return func(*args, **kwargs)

  def __deepcopy__(self, memo):
    if id(self) in memo:
      return memo[id(self)]
    # A copy is an ordinary parameter with the current (synced) values.
    result = torch.nn.Parameter(self.data.clone(memory_format=torch.preserve_format), self.requires_grad)
    memo[id(self)] = result
    return result


def _mirrors_in(args, kwargs) -> list:
  found = []
  for a in (*args, *kwargs.values()):
    items = a if isinstance(a, (list, tuple)) else (a,)
    for x in items:
      if type(x) is APParam:
        m = _OWNERS.get(x)
        if m is not None and m not in found:
          found.append(m)
  return found


class TorchMirror:
  """The torch side of one session: which parameters it owns and whether they are current.

  Args:
    params: the torch parameters (name -> parameter) the session trains.
    write: copies the JAX parameters into the torch parameters.
    read: copies the torch parameters into the JAX state.
    zero_grad: clears the session's gradients (for `torch.nn.Module.zero_grad()`).
    grad_view: `p -> p.grad` as the session has it (a `GradView`, or None without gradients).
    session: the session (clipping reaches it through the parameters' mirror).
  """

  def __init__(self, params: dict[str, torch.nn.Parameter], write: Callable[[], None],
               read: Callable[[], None], zero_grad: Callable[[bool], None],
               grad_view: Callable[[torch.nn.Parameter], torch.Tensor | None], session=None):
    self.params = params
    self.session = session  # the Session this mirror belongs to (for clipping)
    self._names = {id(p): n for n, p in params.items()}
    self._write, self._read, self._zero_grad = write, read, zero_grad
    self.grad_view = grad_view
    self.jax_version = 0    # bumped by every optimizer update (and by reading torch edits back)
    self.torch_version = 0  # the jax_version the torch values hold
    self.maybe_edited = False
    self._versions: dict[int, int] = {}
    self._zero_grad_frame = None
    self.record()

  def name_of(self, p) -> str:
    return self._names.get(id(p), "<parameter>")

  def adopt(self) -> None:
    """Switches the parameters to `APParam` and registers them with this mirror."""
    for p in self.params.values():
      if type(p) is not torch.nn.Parameter:
        raise UnsupportedUsageError(
            f"parameter {self.name_of(p)!r} is a {type(p).__module__}.{type(p).__name__}; the torch "
            "one-liner can only take over plain torch.nn.Parameter objects (another library "
            "already wraps them).")
    for p in self.params.values():
      p.__class__ = APParam
      _OWNERS[p] = self

  def release(self) -> None:
    """Gives the parameters back to torch (plain `nn.Parameter`, the trained values)."""
    if self.edited() and not self.torch_is_current:
      log.warning("ap-xla: releasing a model whose parameters were edited through a stale alias; "
                  "the edit is overwritten by the trained values.")
      self.record()
    self.ensure_torch_current()
    for p in self.params.values():
      if _OWNERS.get(p) is self:
        del _OWNERS[p]
      if type(p) is APParam:
        p.__class__ = torch.nn.Parameter

  @contextlib.contextmanager
  def plain(self):
    """The parameters as plain `nn.Parameter`s (for torch.export) inside the block."""
    for p in self.params.values():
      p.__class__ = torch.nn.Parameter
    try:
      with internal():
        yield
    finally:
      for p in self.params.values():
        p.__class__ = APParam

  def record(self) -> None:
    with internal():
      self._versions = {id(p): p._version for p in self.params.values()}
    self.maybe_edited = False

  def edited(self) -> list[str]:
    """Names of the parameters changed in torch since the last sync."""
    with internal():
      changed = [n for n, p in self.params.items() if p._version != self._versions.get(id(p))]
    if not changed and self.maybe_edited:
      changed = ["<accessed through .data>"]
    return changed

  @property
  def torch_is_current(self) -> bool:
    return self.torch_version == self.jax_version

  def jax_changed(self) -> None:
    self.jax_version += 1

  def ensure_torch_current(self) -> None:
    """Writes the JAX parameters into torch if torch holds older values."""
    if self.torch_is_current:
      return
    edited = self.edited()
    if edited:
      raise self._stale_edit(edited)
    with internal():
      self._write()
    self.record()
    self.torch_version = self.jax_version

  def absorb_torch_edits(self) -> None:
    """Reads torch parameters edited in place back into JAX (before the next training call).

    Raises:
      UnsupportedUsageError: the edit was made on values older than the training state.
    """
    edited = self.edited()
    if not edited:
      return
    if not self.torch_is_current:
      raise self._stale_edit(edited)
    log.info("ap-xla: %d parameter(s) were changed in torch (e.g. %s); reading them back into the "
             "training state.", len(edited), edited[0])
    with internal():
      self._read()
    self.record()
    self.jax_version += 1
    self.torch_version = self.jax_version

  def _stale_edit(self, edited: list[str]) -> UnsupportedUsageError:
    return UnsupportedUsageError(
        f"parameter(s) {edited[:3]} were modified in place through a tensor that held values older "
        "than the training state (an alias taken with .detach() or .data before later optimizer "
        "steps). ap-xla cannot tell what the edit meant for the newer values. Edit the "
        "parameters themselves (p.mul_(...), torch.nn.init.*_(p), model.load_state_dict(...)), "
        "which ap-xla reads back, or call ap_xla.sync_to_torch(model) before taking the alias.")

  def handle_module_zero_grad(self) -> bool:
    """True inside `torch.nn.Module.zero_grad` of a module holding all our parameters."""
    import sys
    frame = sys._getframe(2)
    if frame.f_code is not torch.nn.Module.zero_grad.__code__:
      return False
    module = frame.f_locals.get("self")
    if frame is not self._zero_grad_frame:
      with internal():
        owned = {id(p) for p in module.parameters()} if module is not None else set()
      missing = [n for n, p in self.params.items() if id(p) not in owned]
      if missing:
        raise UnsupportedUsageError(
            f"{type(module).__name__}.zero_grad() clears the gradients of only part of the model "
            f"trained by ap-xla (not {missing[:3]}); ap-xla keeps one gradient accumulator for the "
            "whole model. Call optimizer.zero_grad() or model.zero_grad() on the whole model.")
      self._zero_grad_frame = frame
      self._zero_grad(bool(frame.f_locals.get("set_to_none", True)))
    return True

  def check_no_torch_grads(self) -> None:
    """Raises if torch autograd wrote gradients into our parameters (computed outside the model)."""
    with internal():
      got = [n for n, p in self.params.items() if _raw_grad(p) is not None]
    if got:
      raise UnsupportedUsageError(
          f"torch autograd computed gradients for {got[:3]} outside the model's forward (e.g. a "
          "regularization term on the parameters added to the loss). ap-xla computes the "
          "gradients inside the compiled model forward and cannot add these. Move the term into "
          "the model's forward, or drop it.")


def owner(p) -> TorchMirror | None:
  return _OWNERS.get(p)


def register_state_dict_sync(modules: Iterable[torch.nn.Module], mirror: TorchMirror) -> list:
  """`state_dict()` of the model or any submodule first brings the torch values up to date."""
  handles = []
  for m in modules:
    handles.append(m.register_state_dict_pre_hook(lambda module, prefix, keep_vars: mirror.ensure_torch_current()))
  return handles
