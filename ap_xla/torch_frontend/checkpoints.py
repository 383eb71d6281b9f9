"""Checkpoints of a model trained by the torch one-liner, through `ap_xla.checkpoint` (orbax).

`save_checkpoint` writes the session's JAX training state as it lives (sharded by the plan):
the parameters, the optimizer state, the step (optimizer steps taken), the plan, the data
position the script gives, and the optimizer's param-group hyperparameters (lr included).
Buffers and frozen parameters are not in it: they do not train (save them with
`model.state_dict()` if the script changes them).

`load_checkpoint` restores it:
  * into a model ap-xla already trains: straight into the session's shardings (any plan);
  * into a fresh model and optimizer (a resumed run, before the first training forward):
    the parameters are written into the torch module and the optimizer state into the torch
    optimizer's `state`, in torch's format, which the takeover then reads into the compiled
    update (as it reads a `optimizer.load_state_dict` checkpoint). Until then the model is a
    plain torch model holding the restored weights (eval, `state_dict()` work as usual).
"""
from __future__ import annotations

import json
import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

import jax
import torch

if TYPE_CHECKING:
  from ap_xla import checkpoint as ckpt_lib

log = logging.getLogger("ap_xla")

_KEY = "ap_xla_torch"  # the metadata entry written by save_checkpoint
# Optimizer -> the step of the checkpoint loaded into it before its takeover.
_RESUMED_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LR_KEYS = ("lr", "initial_lr")


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory, *,
                    data_position: Any = None, max_to_keep: int | None = None) -> str:
  """Saves the training state of a model trained by the torch one-liner (atomically, with orbax).

  Args:
    model: the model ap-xla trains (it has run at least one training forward).
    optimizer: its torch optimizer.
    directory: the checkpoint directory; the checkpoint is step `<steps taken>` in it.
    data_position: where the data stream is (any JSON value), given back by `load_checkpoint`.
    max_to_keep: keep only the newest N checkpoints of `directory` (None: all).

  Returns:
    The step directory written.

  Raises:
    ValueError: `model` is not trained by ap-xla, `optimizer` is not its optimizer, or the
      directory already has this step or a newer one.

  Example:
    >>> for i, batch in enumerate(loader):
    ...   model(**batch).loss.backward(); optim.step(); optim.zero_grad()
    ...   if i % 1000 == 999:
    ...     ap_xla.save_checkpoint(model, optim, "/ckpt", data_position=i + 1)
  """
  from ap_xla import checkpoint as ckpt_lib
  model, optimizer = _unwrapped(model, optimizer)
  session = _session(model, optimizer, "save_checkpoint")
  if session is None:
    raise ValueError(
        f"save_checkpoint: {type(model).__name__} is not trained by ap-xla (it is taken over at its "
        "first training forward); save a plain torch model with torch.save(model.state_dict()).")
  meta = {_KEY: {"model": type(model).__name__, "param_names": session.param_names,
                 "param_groups": _groups_json(optimizer)}}
  return ckpt_lib.save(directory, session.steps, session.params, session.opt_state,
                       plan=session.phase.plan, data_position=data_position, metadata=meta,
                       max_to_keep=max_to_keep)


def load_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory, *,
                    step: int | None = None) -> "ckpt_lib.Checkpoint":
  """Restores a checkpoint of `save_checkpoint` into `model` and `optimizer`.

  Works on a model ap-xla already trains and on a fresh model and optimizer built as the
  saving script built them (call it before the first training forward); the plan may
  differ. An LR scheduler is restored by its own `load_state_dict`, as in torch.

  Args:
    model: the model (same architecture as the one saved).
    optimizer: its torch optimizer (same class and param groups as the one saved).
    directory: the checkpoint directory.
    step: the step to read (default: the latest).

  Returns:
    The `ap_xla.checkpoint.Checkpoint` read: `.step` (optimizer steps taken), `.plan` (the
    plan it was written under), `.data_position` (as given to `save_checkpoint`).

  Raises:
    FileNotFoundError: no such checkpoint.
    ValueError: it was written from another model or optimizer configuration.

  Example:
    >>> model, optim = build_model(), torch.optim.AdamW(model.parameters(), lr=1e-4)
    >>> ckpt = ap_xla.load_checkpoint(model, optim, "/ckpt")
    >>> for i, batch in enumerate(loader):
    ...   if i < ckpt.data_position: continue   # already trained on
    ...   model(**batch).loss.backward(); optim.step(); optim.zero_grad()
  """
  from ap_xla import checkpoint as ckpt_lib
  model, optimizer = _unwrapped(model, optimizer)
  session = _session(model, optimizer, "load_checkpoint")
  if step is None:
    step = ckpt_lib.latest_step(directory)
    if step is None:
      raise FileNotFoundError(f"load_checkpoint: no committed checkpoint in {os.fspath(directory)!r}.")
  info = _read_meta(directory, step).get("metadata", {}).get(_KEY)
  if info is None:
    raise ValueError(f"checkpoint step {step} in {os.fspath(directory)!r} was not written by "
                     "ap_xla.save_checkpoint (it has no torch model metadata).")
  names = _tuples(info["param_names"])
  _check_groups(optimizer, info["param_groups"])
  if session is not None:
    if _canonical(names) != _canonical(session.param_names):
      raise ValueError(f"checkpoint step {step} was written from a {info['model']} whose trained "
                       f"parameters differ from those of this {type(model).__name__}; load it into "
                       "the model it was saved from.")
    ckpt = ckpt_lib.restore(directory, session.params, session.opt_state, step=step)
    session.restore_state(ckpt.params, ckpt.opt_state, ckpt.step)
  else:
    ckpt = _restore_into_torch(model, optimizer, directory, step, names)
    _RESUMED_STEPS[optimizer] = ckpt.step
  _set_lrs(optimizer, info["param_groups"])
  log.info("ap-xla: %s resumed from %s at step %d (saved under %s).", type(model).__name__,
           ckpt.path, ckpt.step, ckpt.plan)
  return ckpt


def resumed_step(optimizer) -> int:
  """The step of the checkpoint loaded into `optimizer` before its takeover (0 if none)."""
  return _RESUMED_STEPS.pop(optimizer, 0)


# -- helpers -------------------------------------------------------------------------------

def _unwrapped(model, optimizer):
  """The module and optimizer inside DataParallel / torch.compile / accelerate wrappers."""
  from ap_xla.torch_frontend import adapters
  if isinstance(model, torch.nn.Module):
    model = adapters.unwrap_module(model)
  return model, adapters.unwrap_optimizer(optimizer)


def _session(model, optimizer, what):
  """The session training `model`, or None."""
  if not isinstance(model, torch.nn.Module):
    raise TypeError(f"{what}: model must be a torch.nn.Module, got {type(model).__name__}.")
  if not isinstance(optimizer, torch.optim.Optimizer):
    raise TypeError(f"{what}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
  from ap_xla.torch_frontend import registry
  session = registry.session_of(model)
  if session is not None and session.optimizer is not optimizer:
    raise ValueError(f"{what}: this {type(optimizer).__name__} is not the optimizer ap-xla trains "
                     f"{type(model).__name__} with; pass that one.")
  return session


def _read_meta(directory, step: int) -> dict:
  """The JSON metadata item of a checkpoint step, without reading its arrays."""
  import orbax.checkpoint as ocp
  from ap_xla import checkpoint as ckpt_lib
  path = os.path.abspath(os.fspath(directory))
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  # ap_xla/checkpoint.py writes the metadata as the JSON item named by its _META.
  with ocp.CheckpointManager(path, options=options,
                             item_handlers={ckpt_lib._META: ocp.JsonCheckpointHandler()}) as m:
    if step not in m.all_steps():
      raise FileNotFoundError(f"checkpoint step {step} is not in {path}; committed steps: "
                              f"{sorted(m.all_steps())}.")
    out = m.restore(step, args=ocp.args.Composite(**{ckpt_lib._META: ocp.args.JsonRestore()}))
  return out[ckpt_lib._META]


def _restore_into_torch(model, optimizer, directory, step, names):
  """Restores onto one host device and writes the state into the torch model and optimizer."""
  from ap_xla import checkpoint as ckpt_lib
  from bridge import state
  from bridge.lowering import to_jax
  from bridge.program import training_transform
  from ap_xla.torch_frontend import optim_state
  from ap_xla.torch_frontend.bridges import flat_names as _flat_names

  tensors = dict(model.named_parameters(remove_duplicate=False))
  flat = _flat_names(names)
  missing = [n for n in flat if n not in tensors or not tensors[n].requires_grad]
  if missing:
    raise ValueError(f"checkpoint step {step} trains parameters {missing[:3]} that this "
                     f"{type(model).__name__} does not have as trainable parameters; load it into "
                     "the model it was saved from.")
  sharding = jax.sharding.SingleDeviceSharding(_host_device())

  def leaf(n):
    one = to_jax(tensors[n[0] if isinstance(n, tuple) else n].detach().to("meta"))
    shape = ((len(n),) if isinstance(n, tuple) else ()) + tuple(one.shape)
    return jax.ShapeDtypeStruct(shape, one.dtype, sharding=sharding)
  params = jax.tree.map(leaf, names, is_leaf=_is_name)
  # The optimizer state's structure, as the takeover builds it (at lr 1, from a fresh state).
  saved_lrs, saved_state = [g["lr"] for g in optimizer.param_groups], optimizer.state
  try:
    for g in optimizer.param_groups:
      g["lr"] = 1.0
    optimizer.state = type(saved_state)()
    tx = training_transform(optimizer, model, names)
  finally:
    optimizer.state = saved_state
    for g, lr in zip(optimizer.param_groups, saved_lrs):
      g["lr"] = lr
  opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                           jax.eval_shape(tx.init, params))
  ckpt = ckpt_lib.restore(directory, params, opt_state, step=step)
  state.write_params(model, names, ckpt.params)
  optimizer.state.clear()
  optimizer.state.update(optim_state.export_state(ckpt.opt_state, names, {n: tensors[n] for n in flat}))
  return ckpt


def _host_device():
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # no CPU backend in this process
    return jax.local_devices()[0]


def _is_name(x) -> bool:
  return isinstance(x, (str, tuple))


def _tuples(tree):
  """param_names read back from JSON: the lists of stacked leaves become tuples again."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(tree)
  return tree


def _canonical(names) -> str:
  return json.dumps(names, sort_keys=True)


def _json_value(v):
  if isinstance(v, torch.Tensor):
    return v.tolist()
  if isinstance(v, (list, tuple)):
    return [_json_value(x) for x in v]
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  return repr(v)


def _groups_json(optimizer) -> list[dict]:
  return [{k: _json_value(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _check_groups(optimizer, saved: list[dict]) -> None:
  now = _groups_json(optimizer)
  if len(now) != len(saved):
    raise ValueError(f"the checkpoint was saved from an optimizer with {len(saved)} param group(s); "
                     f"this {type(optimizer).__name__} has {len(now)}. Build the optimizer as the "
                     "saving script did.")
  for i, (a, b) in enumerate(zip(saved, now)):
    for k in sorted(set(a) | set(b)):
      if k in _LR_KEYS or k not in optimizer.defaults:
        continue  # lr is restored; scheduler bookkeeping keys (max_lr, ...) are the scheduler's
      if a.get(k) != b.get(k):
        raise ValueError(f"the checkpoint was saved with param_groups[{i}][{k!r}] = {a.get(k)!r}; "
                         f"this {type(optimizer).__name__} has {b.get(k)!r}. Build the optimizer as "
                         "the saving script did.")


def _set_lrs(optimizer, saved: list[dict]) -> None:
  for g, s in zip(optimizer.param_groups, saved):
    for k in _LR_KEYS:
      if k in s and isinstance(s[k], (int, float)):
        if isinstance(g.get(k), torch.Tensor):
          g[k].fill_(s[k])
        else:
          g[k] = s[k]
