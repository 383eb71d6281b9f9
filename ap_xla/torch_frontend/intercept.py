"""The one patch the torch one-liner makes: `torch.nn.Module.__call__`.

While it is installed (by `enable_advanced_parallelization()`, or by `ap-xla run` for MoAI
scripts), a module call that is

  * top-level (not inside another module's forward),
  * on a module with trainable parameters not yet taken over,
  * in training mode with grad enabled,

takes the module over: its optimizer is found among the live objects (exactly one
`torch.optim.Optimizer` must hold its parameters), a `Session` bridges and plans it, and
every later top-level call of that module runs through the session (so does every other
model trained this way: each gets its own session). What runs as torch runs it: calls nested
in another module's forward, modules without trainable parameters, modules not taken over
called in eval mode or without grad, and a module that shares parameters with a model
already taken over (one of its submodules called by itself, or a module wrapping it), on the
trained weights; gradients torch computes for such a call are refused at `optimizer.step()`.
"""
from __future__ import annotations

import gc
import logging
import threading
import weakref

import torch

from ap_xla import config
from ap_xla.torch_frontend import sync
from ap_xla.torch_frontend.errors import UnsupportedUsageError
from ap_xla.torch_frontend.calls import bind_call
from ap_xla.torch_frontend.session import Session

log = logging.getLogger("ap_xla")

_local = threading.local()
_original_call = None
# Set by `ap-xla run`: without enable_advanced_parallelization, models still run through
# ap-xla, with MoAI's default plan (plain data parallelism, memory checked).
_default_mode = False
_sessions: "weakref.WeakKeyDictionary[torch.nn.Module, Session]" = weakref.WeakKeyDictionary()


def install(default_plan: bool = False) -> None:
  """Patches `torch.nn.Module.__call__` (idempotent).

  Args:
    default_plan: also take models over when AP is not enabled, with plain data
      parallelism (what `ap-xla run` does for MoAI scripts).
  """
  global _original_call, _default_mode
  _default_mode = _default_mode or default_plan
  if torch.nn.Module.__call__ is _ap_call:
    return
  _original_call = torch.nn.Module.__call__
  torch.nn.Module.__call__ = _ap_call


def uninstall() -> None:
  """Restores `torch.nn.Module.__call__` and releases every taken-over model."""
  global _default_mode
  for model in list(_sessions):
    release(model)
  if torch.nn.Module.__call__ is _ap_call:
    torch.nn.Module.__call__ = _original_call
  _default_mode = False


def is_installed() -> bool:
  return torch.nn.Module.__call__ is _ap_call


def session_of(model: torch.nn.Module) -> Session | None:
  return _sessions.get(model)


def release(model: torch.nn.Module) -> bool:
  """Writes the trained weights into `model` and gives it (and its optimizer) back to torch.

  Returns:
    True if `model` was taken over.
  """
  session = _sessions.pop(model, None)
  if session is None:
    return False
  session.release()
  return True


def _active() -> bool:
  return _default_mode or config.is_enabled()


def _depth() -> int:
  return getattr(_local, "depth", 0)


def _ap_call(self, *args, **kwargs):
  if _depth() or sync._is_internal():
    return _original_call(self, *args, **kwargs)
  session = _sessions.get(self)
  if session is None and _eligible(self):
    session = _take_over(self, args, kwargs)
  _local.depth = _depth() + 1
  try:
    if session is None:
      return _original_call(self, *args, **kwargs)
    if self.training and torch.is_grad_enabled():
      return session.training_forward(bind_call(self, args, kwargs))
    return session.forward_only(self, args, kwargs)
  finally:
    _local.depth -= 1


def _eligible(module: torch.nn.Module) -> bool:
  if not (_active() and module.training and torch.is_grad_enabled()):
    return False
  trainable = False
  with sync.internal():
    for p in module.parameters():
      if sync.owner(p) is not None:
        return False  # part of (or containing) a model already taken over: torch runs it
      trainable = trainable or p.requires_grad
  return trainable


def _take_over(model: torch.nn.Module, args, kwargs) -> Session:
  _ensure_visible_log()
  optimizer = find_optimizer(model)
  check_schedulers(optimizer)
  call = bind_call(model, args, kwargs)
  _local.depth = _depth() + 1  # bridging calls the model (torch.export): those are not takeovers
  try:
    session = Session(model, optimizer, call, advanced=config.is_enabled(), original_call=_original_call)
  finally:
    _local.depth -= 1
  _sessions[model] = session
  return session


def find_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
  """The one live torch optimizer that holds `model`'s trainable parameters.

  Raises:
    UnsupportedUsageError: none, or more than one.
  """
  ids = {id(p) for p in model.parameters() if p.requires_grad}
  gc.collect()  # optimizers dropped by the script must not count
  # type(o), not isinstance: some live objects warn when their __class__ is read.
  found = [o for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer)
           and any(id(p) in ids for g in o.param_groups for p in g["params"])]
  name = type(model).__name__
  if not found:
    raise UnsupportedUsageError(
        f"ap-xla takes {name} over at its first training forward and found no torch.optim "
        f"optimizer holding its parameters. Create the optimizer (e.g. torch.optim.AdamW("
        "model.parameters(), lr=...)) before the first training forward, or call the model under "
        "torch.no_grad() / in eval mode if it is not being trained.")
  if len(found) > 1:
    kinds = ", ".join(type(o).__name__ for o in found)
    raise UnsupportedUsageError(
        f"{len(found)} optimizers ({kinds}) hold parameters of {name}; ap-xla runs one optimizer "
        "per model inside the compiled step and cannot honour a second one over the same "
        "parameters. Use one optimizer (param groups can give parameters different "
        "hyperparameters), or delete the unused one before the first training forward.")
  return found[0]


def check_schedulers(optimizer: torch.optim.Optimizer) -> None:
  """Refuses a live LR scheduler of `optimizer` that also cycles momentum or betas.

  ap-xla follows each param group's lr at every step; the other hyperparameters are compiled
  into the update. (A cycling scheduler made after the takeover is caught by the param-group
  check at `optimizer.step()`.)

  Raises:
    UnsupportedUsageError: OneCycleLR or CyclicLR with cycle_momentum=True.
  """
  found = [o for o in gc.get_objects() if issubclass(type(o), torch.optim.lr_scheduler.LRScheduler)
           and getattr(o, "optimizer", None) is optimizer and getattr(o, "cycle_momentum", False)]
  if found:
    name, opt = type(found[0]).__name__, type(optimizer).__name__
    what = "betas[0]" if "betas" in optimizer.defaults else "momentum"
    raise UnsupportedUsageError(
        f"{name}(cycle_momentum=True) changes {what} of {opt}'s param groups at every step; ap-xla "
        f"compiles {what} into the optimizer update and follows only a changing lr. Create the "
        f"scheduler with cycle_momentum=False (the lr still follows its schedule), or run the script "
        "without enable_advanced_parallelization().")


def _ensure_visible_log() -> None:
  """Shows ap-xla's INFO log (the plan) when the script configured no logging, as MoAI does."""
  logger = logging.getLogger("ap_xla")
  if logger.handlers or logging.getLogger().handlers:
    return
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("[ap-xla] %(message)s"))
  logger.addHandler(handler)
  if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)
