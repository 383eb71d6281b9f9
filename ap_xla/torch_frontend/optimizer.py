"""The torch optimizer of a taken-over model, standing in for the compiled update.

At the takeover the optimizer instance (never its class) gets its own `step` and
`zero_grad`, which call the session (the compiled update with each param group's current
lr; clearing the gradient accumulator), and two hooks: `state_dict()` first writes the
optax state into `optimizer.state` in torch's format, `load_state_dict()` reads it back
(`optim_state.py`). A wrapper around it (accelerate's `AcceleratedOptimizer`) forwards to
these. Only `lr` may change between steps (what LR schedulers do): the other hyperparameters
are compiled into the update, and a change to them is refused at the next step.
"""
from __future__ import annotations

import types

import torch

from ap_xla.torch_frontend.errors import UnsupportedUsageError

# Param-group keys that may change between steps (the rest must stay fixed).
_MUTABLE_GROUP_KEYS = ("params", "lr", "initial_lr")


class OptimizerTakeover:
  """The patches on one optimizer instance; `release()` removes them.

  Args:
    optimizer: the torch optimizer.
    step: `step(closure) -> loss`, the compiled update.
    zero_grad: `zero_grad(set_to_none)`.
    export_state: `() -> {param: {key: tensor}}`, the optax state in torch's format.
    import_state: `(state) -> None`, reads torch's state into the optax state.
  """

  def __init__(self, optimizer: torch.optim.Optimizer, step, zero_grad, export_state, import_state):
    self.optimizer = optimizer
    self._groups = group_snapshot(optimizer)
    self._saved = {k: optimizer.__dict__.get(k) for k in ("step", "zero_grad")}

    def step_(self_opt, closure=None):
      return step(closure)
    # What torch's LR schedulers look for on the step they wrap (it records `_opt_called`).
    step_._wrapped_by_lr_sched = True

    def zero_grad_(self_opt, set_to_none: bool = True):
      zero_grad(set_to_none)

    optimizer.step = types.MethodType(step_, optimizer)
    optimizer.zero_grad = types.MethodType(zero_grad_, optimizer)
    self._hooks = [optimizer.register_state_dict_pre_hook(lambda opt: opt.state.update(export_state())),
                   optimizer.register_load_state_dict_post_hook(lambda opt: import_state(dict(opt.state)))]

  def check_groups(self) -> None:
    """Raises if a param-group entry other than the lr changed since the takeover."""
    now = group_snapshot(self.optimizer)
    if now != self._groups:
      diff = _describe_group_change(self._groups, now)
      raise UnsupportedUsageError(
          f"the optimizer's param groups changed after ap-xla took it over ({diff}); only 'lr' may "
          "change between steps (schedulers that also cycle momentum or betas, add_param_group "
          "and edited hyperparameters are not supported). Set them before the first training "
          "forward.")

  def release(self) -> None:
    for h in self._hooks:
      h.remove()
    for k, v in self._saved.items():
      if v is None:
        self.optimizer.__dict__.pop(k, None)
      else:
        setattr(self.optimizer, k, v)


def _freeze(v):
  if isinstance(v, torch.Tensor):
    return tuple(v.reshape(-1).tolist())
  if isinstance(v, (list, tuple)):
    return tuple(_freeze(x) for x in v)
  return v


def group_snapshot(optimizer) -> tuple:
  keys = [k for k in optimizer.defaults if k not in _MUTABLE_GROUP_KEYS]
  return tuple((tuple(id(p) for p in g["params"]), tuple((k, _freeze(g.get(k))) for k in keys))
               for g in optimizer.param_groups)


def _describe_group_change(before, now) -> str:
  if len(before) != len(now):
    return f"{len(before)} param groups became {len(now)}"
  for i, ((p0, h0), (p1, h1)) in enumerate(zip(before, now)):
    if p0 != p1:
      return f"param_groups[{i}]['params'] changed"
    for (k, v0), (_, v1) in zip(h0, h1):
      if v0 != v1:
        return f"param_groups[{i}][{k!r}]: {v0!r} -> {v1!r}"
  return "unknown change"
