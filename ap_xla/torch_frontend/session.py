"""One taken-over model: its bridged programs, plan phases, JAX training state, optimizer.

A `Session` is made at the model's first training call (see `intercept.py`). It bridges the
model and its torch optimizer to a JAX `Program`, plans it (the AP search, or MoAI's plain
data parallelism when AP is off) and from then on runs:

  * a training forward as the phase's compiled `loss_and_grad` (returns a real torch loss;
    `loss.backward()` adds the gradients, scaled by the backward's grad_output, into the
    accumulator);
  * `optimizer.step()` as the compiled update with each param group's current lr;
  * `optimizer.zero_grad()` / `model.zero_grad()` as clearing the accumulator;
  * a forward under `torch.no_grad()` in training mode as the bridged forward in JAX; in
    eval mode, or with inputs the training call did not have, as the torch module itself
    on parameters brought up to date (exact, not compiled).

The optimizer's `step` and `zero_grad` are replaced on the instance (the class is left
alone); its `state_dict()` / `load_state_dict()` carry the optax state in torch's format
(`optim_state.py`), so checkpoints save and resume (`ap_xla.save_checkpoint` saves the JAX
state itself: `checkpoints.py`). The parameters become `sync.APParam`s. Buffers and frozen
parameters are constants of the programs (`constants.py`): a forward that updates buffers is
refused at the takeover, and a constant changed later in torch makes the session bridge the
model again. `release()` undoes all of it.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import types
from typing import Any

import jax
import optax
import torch

from ap_xla.torch_frontend import optim_state
from ap_xla.torch_frontend.constants import ConstantWatch, check_no_buffer_updates
from ap_xla.torch_frontend.calls import Call, bind_call, describe as _describe, jax_batch as _jax_batch
from ap_xla.torch_frontend import outputs as out_lib
from ap_xla.torch_frontend import phases as phase_lib
from ap_xla.torch_frontend.errors import UnsupportedUsageError
from ap_xla.torch_frontend.sync import TorchMirror, internal, register_state_dict_sync
from passes.program import abstractify

log = logging.getLogger("ap_xla")
PyTree = Any

# Optimizer param-group keys that may change between steps (the rest must stay fixed).
_MUTABLE_GROUP_KEYS = ("params", "lr", "initial_lr")


# -- per-program state -------------------------------------------------------------------

class _Bridge:
  """A bridged program for one input signature, with its jitted forward."""

  def __init__(self, key, bridged):
    self.key, self.bridged = key, bridged
    self.program = dataclasses.replace(bridged.program, params=abstractify(bridged.program.params))
    self.forward = jax.jit(bridged.forward)
    self.out_spec = bridged.captured.out_spec


@dataclasses.dataclass(frozen=True)
class _Planned:
  """A phase with the program it runs and the tensor sizes it was planned for."""
  phase: phase_lib.Phase
  bridge: _Bridge
  sizes: dict


class _Pending:
  """The gradients of one training forward, until its loss is back-propagated."""

  def __init__(self, grads, phase):
    self.grads, self.phase = grads, phase


# -- the session -------------------------------------------------------------------------

class Session:
  """The JAX training state of one torch model and the torch objects it stands in for.

  Args:
    model: the module being trained (in training mode).
    optimizer: its torch optimizer (the only one over its parameters).
    call: the inputs of the first training call.
    advanced: run the AP search (False: MoAI's default, plain data parallelism).
    original_call: `torch.nn.Module.__call__` before ap-xla's patch (for eager calls).
  """

  def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, call: Call,
               advanced: bool, original_call):
    self.model, self.optimizer, self.advanced = model, optimizer, advanced
    self._original_call = original_call
    self.devices = tuple(jax.devices())
    from ap_xla.torch_frontend import checkpoints
    self.steps = checkpoints.resumed_step(optimizer)  # 0 unless load_checkpoint ran before the takeover
    self._bridges: dict = {}
    self._planned: dict = {}
    self.current: _Planned | None = None
    self.acc = None
    self.opt_state = None
    self._eager_logged: set = set()
    self.anchor = torch.zeros((), requires_grad=True)

    self._check_optimizer_params()
    # A resumed optimizer holds state (its checkpoint): bridge it fresh, then read the state in.
    resumed, optimizer.state = optimizer.state, collections.defaultdict(dict)
    try:
      first = self._bridge_first(call)
    finally:
      optimizer.state = resumed
    names = first.bridged.param_names
    self.param_names = names
    self._io = first.bridged  # reads and writes the torch parameters (any bridge would do)
    self._watch = ConstantWatch(model, [n for n in first.bridged.captured.constant_values
                                        if not n.startswith("<")])
    from bridge import state
    self.labels = state.group_tree(optimizer, model, names)
    self.tx = first.program.optimizer
    self.params = first.bridged.program.params
    self._groups = _group_snapshot(optimizer)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    managed = {n: tensors[n] for n in _flat_names(names)}
    self._requires_grad = {n: p.requires_grad for n, p in managed.items()}
    self.mirror = TorchMirror(managed, write=self._write_torch, read=self._read_torch,
                              zero_grad=self.zero_grad)
    self._activate(self._phase_for(first, call))
    self._load_optimizer_state({p: v for p, v in resumed.items() if v})
    self.mirror.adopt()
    self._hooks = register_state_dict_sync(model.modules(), self.mirror)
    self._hooks += self._patch_optimizer()
    log.info("ap-xla took over %s: %s. optimizer.step() runs the compiled update from now on.",
             type(model).__name__, self.phase.plan)

  # -- bridging and planning -------------------------------------------------------------
  def _check_optimizer_params(self):
    ids = {id(p) for p in self.model.parameters()}
    foreign = sum(1 for g in self.optimizer.param_groups for p in g["params"] if id(p) not in ids)
    if foreign:
      raise UnsupportedUsageError(
          f"{type(self.optimizer).__name__} also holds {foreign} parameter(s) that are not in "
          f"{type(self.model).__name__}; ap-xla trains one model per optimizer and would not "
          "update them. Give the other parameters their own optimizer, or put them in the model.")

  def _bridge_first(self, call: Call) -> _Bridge:
    from bridge.capture import CaptureError, NoLossError
    from bridge.lowering import UnsupportedOperatorError
    from bridge.program import bridge_model
    from bridge.schedules import UnsupportedTorchOptimError
    saved = [g["lr"] for g in self.optimizer.param_groups]
    try:
      # Built at lr 1: `update` multiplies each group's update by its lr at every step.
      for g in self.optimizer.param_groups:
        g["lr"] = 1.0
      with internal():
        bridged = bridge_model(self.model, call.batch, optimizer=self.optimizer)
    except UnsupportedTorchOptimError as e:
      raise UnsupportedUsageError(f"ap-xla cannot run this optimizer: {e}") from e
    except (UnsupportedOperatorError, CaptureError) as e:
      raise UnsupportedUsageError(
          f"ap-xla cannot train {type(self.model).__name__}: {e}\nTo train it with plain torch "
          "instead, run the script without enable_advanced_parallelization() (and not under `ap-xla "
          "run`).") from e
    except NoLossError as e:
      raise UnsupportedUsageError(
          f"{type(self.model).__name__}'s forward does not return a loss. ap-xla takes the training "
          "step over at the model's forward, so the forward must return the loss (pass labels to "
          "a Hugging Face model; or return the loss, or a tuple starting with it). A loss computed "
          "outside the model from its outputs cannot be planned: move it into the forward (e.g. "
          f"a wrapper nn.Module). ({e})") from e
    finally:
      for g, lr in zip(self.optimizer.param_groups, saved):
        g["lr"] = lr
    check_no_buffer_updates(self.model, bridged.captured.mutated_buffers)
    return self._remember(call, bridged)

  def _remember(self, call: Call, bridged) -> _Bridge:
    key = call.shape_key(with_batch=not bridged.captured.dynamic_batch)
    b = _Bridge(key, bridged)
    self._bridges[key] = b
    return b

  def _find_bridge(self, call: Call) -> _Bridge | None:
    for with_batch in (False, True):
      b = self._bridges.get(call.shape_key(with_batch))
      if b is not None:
        return b
    return None

  def _bridge_for(self, call: Call) -> _Bridge:
    b = self._find_bridge(call)
    if b is not None:
      return b
    from bridge.program import bridge_model
    if self._bridges:  # else they were dropped for new constants, which _check_constants logged
      log.info("ap-xla: a training call with other inputs or shapes (%s); bridging the model for it.",
               _describe(call))
    with self.mirror.plain():
      bridged = bridge_model(self.model, call.batch, optimizer=optax.identity())
    self._watch.record()
    if jax.tree.structure(bridged.param_names, is_leaf=_is_name) != jax.tree.structure(
        self.param_names, is_leaf=_is_name) or _flat_names(bridged.param_names) != _flat_names(self.param_names):
      raise UnsupportedUsageError(
          f"the training call with inputs {_describe(call)} reads other parameters (or cuts the "
          "model differently) than the first training call; ap-xla keeps one training state per "
          "model. Call the model with the same inputs each step.")
    bridged = dataclasses.replace(bridged, program=dataclasses.replace(bridged.program, optimizer=self.tx))
    return self._remember(call, bridged)

  def _phase_for(self, bridge: _Bridge, call: Call) -> _Planned:
    """The phase for this call's batch: the current plan when it can run it, else a new search."""
    size = call.batch_size
    key = (bridge.key, size)
    if key in self._planned:
      return self._planned[key]
    program = dataclasses.replace(bridge.program, batch=abstractify(_jax_batch(call)))
    now = self.current
    planned = None
    if now is not None:
      why = now.phase.batch_ok(size)
      if why is None and any(v.numel() > now.sizes.get(k, -1) for k, v in call.tensors.items()):
        why = f"larger than the planned batch ({_describe(call)})"
      if why is None:
        phase = now.phase if bridge is now.bridge else phase_lib.build_phase(
            program, now.phase.plan, now.phase.devices, self.labels, now.phase.report)
        planned = _Planned(phase, bridge, now.sizes)
        log.info("ap-xla: batch of %d (%s) reuses %s.", size, _describe(call), phase.plan)
      else:
        log.info("ap-xla: batch of %d (%s) cannot reuse %s (%s); re-planning.", size, _describe(call),
                 now.phase.plan, why)
    if planned is None:
      report, devices = phase_lib.choose_plan(program, self.devices, self.advanced)
      phase = phase_lib.build_phase(program, report.plan, devices, self.labels, report)
      planned = _Planned(phase, bridge, {k: v.numel() for k, v in call.tensors.items()})
      log.info("ap-xla plan for %s with batch %d: %s", program.name, size, report.plan)
    self._planned[key] = planned
    return planned

  @property
  def phase(self) -> phase_lib.Phase | None:
    return self.current.phase if self.current is not None else None

  def _activate(self, planned: _Planned) -> None:
    """Places the training state with the phase's shardings (a no-op for the current phase)."""
    phase = planned.phase
    if phase is self.phase:
      self.current = planned
      return
    self.params = jax.device_put(self.params, phase.param_shardings)
    if self.opt_state is None:
      self.opt_state = phase.built.init_opt(self.params)
    else:
      self.opt_state = jax.device_put(self.opt_state, phase.built.opt_shardings)
    if self.acc is not None:
      self.acc = jax.device_put(self.acc, phase.param_shardings)
    self.current = planned

  # -- torch <-> JAX ---------------------------------------------------------------------
  def _write_torch(self) -> None:
    self._io.to_torch(self.params)

  def _read_torch(self) -> None:
    self.params = jax.device_put(self._io.from_torch(), self.phase.param_shardings)

  def sync_to_torch(self) -> None:
    """Writes the trained parameters into the torch module (if it holds older values)."""
    self.mirror.ensure_torch_current()

  def _check_constants(self) -> None:
    """Drops the bridged programs when a buffer or frozen parameter they baked in changed.

    The next training call bridges the model again with the new values and recompiles the
    current plan for it (no search when its batch fits the plan).
    """
    changed = self._watch.changed()
    if not changed:
      return
    log.info("ap-xla: %d buffer(s) or frozen parameter(s) of %s changed in torch (e.g. %s); the "
             "compiled programs hold them as constants, so the model is bridged again with the new "
             "values (the plan is kept).", len(changed), type(self.model).__name__, changed[0])
    self._bridges.clear()
    self._planned.clear()
    self._watch.record()

  # -- the training calls ----------------------------------------------------------------
  def _check_trainable(self):
    with internal():
      changed = [n for n, p in self.mirror.params.items() if p.requires_grad != self._requires_grad[n]]
    if changed:
      raise UnsupportedUsageError(
          f"requires_grad of {changed[:3]} changed after ap-xla took the model over; the compiled "
          "program trains the parameters that were trainable at the first training call. Freeze "
          "or unfreeze parameters before the first training forward.")

  def training_forward(self, call: Call):
    """The forward of a training call: loss and gradients in one compiled program."""
    if call.batch_size < 0:
      shapes = {k: tuple(v.shape) for k, v in call.tensors.items()}
      raise ValueError(f"every tensor input of {type(self.model).__name__} must have the batch as "
                       f"its leading dimension, with one size; got {shapes}.")
    self._check_trainable()
    self._check_constants()
    self.mirror.absorb_torch_edits()
    bridge = self._bridge_for(call)
    self._activate(self._phase_for(bridge, call))
    phase = self.phase
    batch = jax.device_put(_jax_batch(call), phase.built.batch_shardings)
    loss, grads = phase.built.loss_and_grad(self.params, batch)
    pending = _Pending(grads, phase)
    loss_t = out_lib.LossFunction.apply(self.anchor, float(loss), lambda g: self._backward(pending, g))
    version, params = self.mirror.jax_version, self.params

    def compute():
      if self.mirror.jax_version != version:
        raise UnsupportedUsageError(
            "model outputs other than the loss are computed when first read, from the parameters "
            "of their forward; those were changed since (optimizer.step()). Read the outputs "
            "(e.g. outputs.logits) before optimizer.step().")
      return bridge.forward(params, _jax_batch(call))

    return self._wrap(bridge, loss_t, compute, call.forced)

  def _wrap(self, bridge: _Bridge, loss_t, compute, forced):
    spec = bridge.out_spec
    lazy = out_lib._Lazy(compute, self.anchor)
    if spec.type is not None and hasattr(spec.type, "to_tuple"):  # a transformers ModelOutput
      unavailable = {k: v for k, v in forced.items()}
      return out_lib.TrainingOutputs(loss_t, tuple(spec.context), spec.type, lazy, unavailable)
    if spec.type in (tuple, list):
      return out_lib.TrainingTuple(loss_t, spec.num_children, lazy)
    if spec.num_children == 0:  # the forward returns the loss tensor itself
      return loss_t
    raise UnsupportedUsageError(f"{type(self.model).__name__}.forward returns a {spec.type}; ap-xla "
                                "supports a loss tensor, a tuple starting with the loss, or a ModelOutput.")

  def _backward(self, pending: _Pending, grad_output: torch.Tensor) -> None:
    if pending.grads is None:
      raise UnsupportedUsageError(
          "backward was called a second time through the same loss (retain_graph=True); ap-xla "
          "adds a forward's gradients once. Run the forward again for another backward.")
    s = float(grad_output)
    grads, pending.grads = pending.grads, None
    if pending.phase is not self.phase:
      grads = jax.device_put(grads, self.phase.param_shardings)
    scale = jax.numpy.float32(s)
    if self.acc is None:
      self.acc = grads if s == 1.0 else self.phase.scale(grads, scale)
    else:
      self.acc = self.phase.accumulate(self.acc, grads, scale)

  def step(self, closure=None):
    """`optimizer.step()`: the compiled update with each param group's lr now."""
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    self._check_groups()
    self.mirror.absorb_torch_edits()
    self.mirror.check_no_torch_grads()
    self.optimizer._opt_called = True  # what torch's step wrapper records for LR schedulers
    if self.acc is None:  # no parameter has a gradient: torch skips them all
      return loss
    lrs = phase_lib.group_lrs(self.optimizer)
    self.params, self.opt_state = self.phase.update(self.params, self.opt_state, self.acc, lrs)
    self.mirror.jax_changed()
    self.steps += 1
    return loss

  def zero_grad(self, set_to_none: bool = True) -> None:
    """`optimizer.zero_grad()`: clears the accumulator (zeros when set_to_none=False)."""
    self.acc = None if set_to_none else self.phase.zeros(self.params)

  def _check_groups(self):
    now = _group_snapshot(self.optimizer)
    if now != self._groups:
      diff = _describe_group_change(self._groups, now)
      raise UnsupportedUsageError(
          f"the optimizer's param groups changed after ap-xla took it over ({diff}); only 'lr' may "
          "change between steps (schedulers that also cycle momentum or betas, add_param_group "
          "and edited hyperparameters are not supported). Set them before the first training "
          "forward.")

  def forward_only(self, model, args, kwargs):
    """A call without gradients: the bridged forward in JAX, or the torch module on synced weights."""
    self._check_constants()
    self.mirror.absorb_torch_edits()
    call = None
    if model.training:
      try:
        call = bind_call(model, args, kwargs)
      except (TypeError, UnsupportedUsageError):
        call = None
    bridge = self._find_bridge(call) if call is not None and not call.forced else None
    if bridge is None:
      reason = "eval mode" if not model.training else "inputs other than the training call's"
      if reason not in self._eager_logged:
        self._eager_logged.add(reason)
        log.info("ap-xla: forward without gradients in %s runs the torch module on the trained "
                 "weights (not compiled).", reason)
      self.mirror.ensure_torch_current()
      return self._original_call(model, *args, **kwargs)
    outs = bridge.forward(self.params, _jax_batch(call))
    return out_lib.rebuild(outs, bridge.out_spec.type)

  # -- the optimizer -----------------------------------------------------------------------
  def _patch_optimizer(self) -> list:
    opt = self.optimizer
    self._saved_methods = {k: opt.__dict__.get(k) for k in ("step", "zero_grad")}
    session = self

    def step(self_opt, closure=None):
      return session.step(closure)
    # What torch's LR schedulers look for on the step they wrap (it records `_opt_called`).
    step._wrapped_by_lr_sched = True

    def zero_grad(self_opt, set_to_none: bool = True):
      session.zero_grad(set_to_none)

    opt.step = types.MethodType(step, opt)
    opt.zero_grad = types.MethodType(zero_grad, opt)

    def save_state(optimizer):
      optimizer.state.update(self._torch_optimizer_state())

    def load_state(optimizer):
      self._load_optimizer_state(dict(optimizer.state))
    return [opt.register_state_dict_pre_hook(save_state),
            opt.register_load_state_dict_post_hook(load_state)]

  def _torch_optimizer_state(self) -> dict:
    return optim_state.export_state(self.opt_state, self.param_names, self.mirror.params)

  def _load_optimizer_state(self, torch_state: dict) -> None:
    """Reads torch's optimizer state (a checkpoint being resumed) into the optax state."""
    if not torch_state:
      return
    state = optim_state.import_state(self.opt_state, self.param_names, self.mirror.params, torch_state)
    self.opt_state = jax.device_put(state, self.phase.built.opt_shardings)
    log.info("ap-xla: read the torch optimizer state (%d parameters) into the compiled update.",
             len(torch_state))

  # -- checkpoints (see checkpoints.py) ---------------------------------------------------
  def restore_state(self, params: PyTree, opt_state: PyTree, step: int) -> None:
    """Replaces the training state by a restored one (placed with the current phase's shardings).

    Torch edits not yet read back are dropped: the restored state replaces every parameter.
    """
    self.params, self.opt_state, self.steps = params, opt_state, step
    self.mirror.record()
    self.mirror.jax_changed()

  def release(self) -> None:
    """Writes the weights back and gives the model and optimizer back to torch."""
    self.mirror.release()
    for h in self._hooks:
      h.remove()
    for k, v in self._saved_methods.items():
      if v is None:
        self.optimizer.__dict__.pop(k, None)
      else:
        setattr(self.optimizer, k, v)

  def __repr__(self):
    return f"Session({type(self.model).__name__}, {self.phase.plan if self.phase else None}, steps={self.steps})"


# -- helpers -----------------------------------------------------------------------------

def _is_name(x) -> bool:
  return isinstance(x, (str, tuple))


def _flat_names(names) -> list[str]:
  out = []
  for leaf in jax.tree.leaves(names, is_leaf=_is_name):
    for n in (leaf if isinstance(leaf, tuple) else (leaf,)):
      if n not in out:
        out.append(n)
  return out


def _freeze(v):
  if isinstance(v, torch.Tensor):
    return tuple(v.reshape(-1).tolist())
  if isinstance(v, (list, tuple)):
    return tuple(_freeze(x) for x in v)
  return v


def _group_snapshot(optimizer) -> tuple:
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
