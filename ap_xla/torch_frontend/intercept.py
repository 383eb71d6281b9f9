"""Model takeover: `torch.nn.Module.__call__`, patched while the front end is installed.

A module call that is

  * top-level (not inside another module's forward),
  * on a module with trainable parameters not yet taken over,
  * in training mode with grad enabled,

takes the module over: its optimizer is found among the live objects (exactly one
`torch.optim.Optimizer` must hold its parameters, wrappers seen through: `adapters.py`), a
`Session` bridges and plans it, and every later top-level call of that module runs through
the session (so does every other model trained this way: each gets its own session). A call
of a DataParallel / DistributedDataParallel / torch.compile wrapper is a call of the module
it wraps. What runs as torch runs it: calls nested in another module's forward, modules
without trainable parameters, modules not taken over called in eval mode or without grad,
and a module that shares parameters with a model already taken over (one of its submodules
called by itself, or a module wrapping it), on the trained weights.

A training forward under `torch.autocast` (or accelerate's mixed-precision forward) is
planned in bf16 (`devices.autocast_dtype`).
"""
from __future__ import annotations

import logging
import threading

import torch

from ap_xla import config
from ap_xla.torch_frontend import adapters, devices, registry, sync
from ap_xla.torch_frontend.calls import bind_call
from ap_xla.torch_frontend.session import Session

log = logging.getLogger("ap_xla")

_local = threading.local()
_original_call = None
# Set by `ap-xla run`: without enable_advanced_parallelization, models still run through
# ap-xla, with MoAI's default plan (plain data parallelism, memory checked).
_default_mode = False


def install(patches, default_plan: bool = False) -> None:
  """Patches `torch.nn.Module.__call__` through `patches` (idempotent).

  Args:
    default_plan: also take models over when AP is not enabled, with plain data
      parallelism (what `ap-xla run` does for MoAI scripts).
  """
  global _original_call, _default_mode
  _default_mode = _default_mode or default_plan
  if torch.nn.Module.__call__ is _ap_call:
    return
  _original_call = torch.nn.Module.__call__
  patches.set(torch.nn.Module, "__call__", _ap_call)


def release_all() -> None:
  """Releases every taken-over model and forgets `ap-xla run`'s default plan."""
  global _default_mode
  for model in registry.models():
    release(model)
  _default_mode = False


def is_installed() -> bool:
  return torch.nn.Module.__call__ is _ap_call


def session_of(model: torch.nn.Module) -> Session | None:
  return registry.session_of(model)


def release(model: torch.nn.Module) -> bool:
  """Writes the trained weights into `model` and gives it (and its optimizer) back to torch.

  Returns:
    True if `model` was taken over.
  """
  session = registry.pop(model)
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
  inner = adapters.unwrap_module(self)
  if inner is not self:
    return _ap_call(inner, *args, **kwargs)
  session = registry.session_of(self)
  if session is None and _eligible(self):
    session = _take_over(self, args, kwargs)
  _local.depth = _depth() + 1
  try:
    if session is None:
      return _original_call(self, *args, **kwargs)
    if self.training and torch.is_grad_enabled():
      return session.training_forward(bind_call(self, args, kwargs), _mixed_precision(self))
    return session.forward_only(self, args, kwargs)
  finally:
    _local.depth -= 1


def _mixed_precision(model: torch.nn.Module) -> bool:
  """Whether this training forward runs under autocast (torch's, or accelerate's wrapper)."""
  dtype = devices.autocast_dtype() or adapters.amp_dtype(model)
  if dtype is None:
    return False
  if dtype != torch.bfloat16 and not getattr(_local, "fp16_logged", False):
    _local.fp16_logged = True
    log.info("ap-xla: autocast to %s runs as the plan's bf16 mixed precision (bf16 has float32's "
             "range: no loss scaling is needed).", dtype)
  return True


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
  optimizer = adapters.find_optimizer(model)
  adapters.check_schedulers(optimizer)
  call = bind_call(model, args, kwargs)
  _local.depth = _depth() + 1  # bridging calls the model (torch.export): those are not takeovers
  try:
    session = Session(model, optimizer, call, advanced=config.is_enabled(), original_call=_original_call,
                      mixed_precision=_mixed_precision(model),
                      plain_forward=lambda: adapters.plain_forward(model))
  finally:
    _local.depth -= 1
  registry.register(model, session)
  return session


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
