"""One taken-over model: its JAX training state and the torch calls that drive it.

A `Session` is made at the model's first training call (`intercept.py`). It bridges the
model (`bridges.py`), plans each batch (`phases.py`: the AP search, or plain data
parallelism when AP is off) and from then on runs:

  * a training forward as the phase's compiled `loss_and_grad` (returns a real torch loss;
    `loss.backward()` adds the gradients, scaled by the backward's grad_output, into the
    accumulator); under autocast the phase's plan is bf16;
  * `optimizer.step()` as the compiled update with each param group's current lr and the
    clip coefficient of any `clip_grad_norm_` since the last step (`optimizer.py`,
    `clipping.py`);
  * `optimizer.zero_grad()` / `model.zero_grad()` as clearing the accumulator;
  * `p.grad` as a read-only view of the gradient accumulator (`accumulator.py`, `grads.py`);
  * a forward under `torch.no_grad()` in training mode as the bridged forward in JAX; in
    eval mode, or with inputs the training call did not have, as the torch module itself
    on parameters brought up to date (exact, not compiled).

The parameters become `sync.APParam`s, kept consistent with the JAX state (`sync.py`).
`release()` undoes all of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import jax
import torch

from ap_xla import config
from ap_xla.torch_frontend import checkpoints, device_memory, optim_state
from ap_xla.torch_frontend.accumulator import Accumulator
from ap_xla.torch_frontend import outputs as out_lib
from ap_xla.torch_frontend import phases as phase_lib
from ap_xla.torch_frontend.bridges import BridgeCache, Bridged, flat_names
from ap_xla.torch_frontend.calls import Call, bind_call, describe, jax_batch
from ap_xla.torch_frontend.errors import UnsupportedUsageError
from ap_xla.torch_frontend.optimizer import OptimizerTakeover
from ap_xla.torch_frontend.sync import TorchMirror, internal, register_state_dict_sync
from passes.program import abstractify

log = logging.getLogger("ap_xla")
PyTree = Any


@dataclasses.dataclass(frozen=True)
class _Planned:
  """A phase with the program it runs and the tensor sizes it was planned for."""
  phase: phase_lib.Phase
  bridge: Bridged
  sizes: dict
  mixed: bool  # planned for a forward under autocast


def _as_dtypes(tree: PyTree, like: PyTree) -> PyTree:
  """`tree` with the dtypes of `like` (fp32 master weights of a bf16 model, `phases.fp32_masters`)."""
  return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), tree, like)


class _Pending:
  """The gradients of one training forward, until its loss is back-propagated."""

  def __init__(self, grads, phase, rescale: float):
    self.grads, self.phase, self.rescale = grads, phase, rescale


class Session:
  """The JAX training state of one torch model and the torch objects it stands in for.

  Args:
    model: the module being trained (in training mode).
    optimizer: its torch optimizer (the only one over its parameters).
    call: the inputs of the first training call.
    advanced: run the AP search (False: MoAI's default, plain data parallelism).
    original_call: `torch.nn.Module.__call__` before ap-xla's patch (for eager calls).
    mixed_precision: the first call runs under autocast (a bf16 plan).
    plain_forward: context manager factory exposing the model's own forward (for export).
  """

  def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, call: Call,
               advanced: bool, original_call, mixed_precision: bool = False,
               plain_forward=contextlib.nullcontext):
    self.model, self.optimizer, self.advanced = model, optimizer, advanced
    self._original_call = original_call
    self.devices = tuple(jax.devices())
    self.steps = checkpoints.resumed_step(optimizer)  # 0 unless load_checkpoint ran before the takeover
    self._planned: dict = {}
    self.current: _Planned | None = None
    self.opt_state = None
    self._eager_logged: set = set()
    self.anchor = torch.zeros((), requires_grad=True)

    self._check_optimizer_params()
    resumed = {p: v for p, v in optimizer.state.items() if v}
    self.bridges = BridgeCache(model, optimizer, call, plain_forward)
    first = self.bridges.first
    self.param_names = names = self.bridges.param_names
    # gradients and optimizer state: of the trainable leaves (None at frozen ones)
    self.grad_names = first.bridged.trainable_names
    from bridge import state
    self.labels = state.group_tree(optimizer, model, self.grad_names)
    self.params = first.bridged.program.params
    tensors = dict(model.named_parameters(remove_duplicate=False))
    managed = {n: tensors[n] for n in flat_names(names)}
    self.grads = Accumulator(self.grad_names, lambda: self.phase, lambda n: managed[n].dtype)
    self._requires_grad = {n: p.requires_grad for n, p in managed.items()}
    self.mirror = TorchMirror(managed, write=lambda: self.bridges.io.to_torch(self.params),
                              read=self._read_torch, zero_grad=self.zero_grad,
                              grad_view=lambda p: self.grads.view(p, self.mirror.name_of(p)),
                              session=self)
    self._activate(self._phase_for(first, call, mixed_precision))
    self._load_optimizer_state(resumed)
    self.mirror.adopt()
    self._hooks = register_state_dict_sync(model.modules(), self.mirror)
    self.opt = OptimizerTakeover(optimizer, self.step, self.zero_grad, self._torch_optimizer_state,
                                 self._load_optimizer_state)
    log.info("ap-xla took over %s: %s. optimizer.step() runs the compiled update from now on.",
             type(model).__name__, self.phase.plan)

  def _check_optimizer_params(self):
    ids = {id(p) for p in self.model.parameters()}
    foreign = sum(1 for g in self.optimizer.param_groups for p in g["params"] if id(p) not in ids)
    if foreign:
      raise UnsupportedUsageError(
          f"{type(self.optimizer).__name__} also holds {foreign} parameter(s) that are not in "
          f"{type(self.model).__name__}; ap-xla trains one model per optimizer and would not "
          "update them. Give the other parameters their own optimizer, or put them in the model.")

  # -- planning ----------------------------------------------------------------------------
  def _phase_for(self, bridge: Bridged, call: Call, mixed: bool) -> _Planned:
    """The phase for this call's batch: the current plan when it can run it, else a new search."""
    size = call.batch_size
    key = (bridge.key, size, mixed)
    if key in self._planned:
      return self._planned[key]
    program = dataclasses.replace(bridge.program, batch=abstractify(jax_batch(call)))
    if mixed or (self.advanced and getattr(config.current_options(), "mixed_precision", True)):
      program = phase_lib.fp32_masters(program)
    now = self.current
    planned = None
    if now is not None and now.mixed != mixed:
      log.info("ap-xla: a training forward %s autocast; planning it%s.", "under" if mixed else "without",
               " in bf16" if mixed else "")
    elif now is not None:
      why = now.phase.batch_ok(size)
      if why is None and any(v.numel() > now.sizes.get(k, -1) for k, v in call.tensors.items()):
        why = f"larger than the planned batch ({describe(call)})"
      if why is None:
        phase = now.phase if bridge is now.bridge else phase_lib.build_phase(
            program, now.phase.plan, now.phase.devices, self.labels, now.phase.report)
        planned = _Planned(phase, bridge, now.sizes, mixed)
        log.info("ap-xla: batch of %d (%s) reuses %s.", size, describe(call), phase.plan)
      else:
        log.info("ap-xla: batch of %d (%s) cannot reuse %s (%s); re-planning.", size, describe(call),
                 now.phase.plan, why)
    if planned is None:
      report, devices = phase_lib.choose_plan(program, self.devices, self.advanced, mixed,
                                              checkpointing=self._checkpointing())
      phase = phase_lib.build_phase(program, report.plan, devices, self.labels, report)
      planned = _Planned(phase, bridge, {k: v.numel() for k, v in call.tensors.items()}, mixed)
      log.info("ap-xla plan for %s with batch %d: %s", program.name, size, report.plan)
    self._planned[key] = planned
    return planned

  def _checkpointing(self) -> bool:
    """Whether the model asked for gradient checkpointing (a Hugging Face model's
    `gradient_checkpointing_enable()`; a peft model forwards the attribute to its base).
    transformers 5 names it `is_activation_checkpointing` (the old name warns); older ones
    only have `is_gradient_checkpointing`."""
    flag = getattr(self.model, "is_activation_checkpointing", None)
    if flag is None:
      flag = getattr(self.model, "is_gradient_checkpointing", False)
    return bool(flag)

  @property
  def phase(self) -> phase_lib.Phase | None:
    return self.current.phase if self.current is not None else None

  def _activate(self, planned: _Planned) -> None:
    """Places the training state with the phase's shardings (a no-op for the current phase)."""
    phase = planned.phase
    if phase is self.phase:
      self.current = planned
      return
    self.params = jax.device_put(_as_dtypes(self.params, phase.program.params), phase.param_shardings)
    if self.opt_state is None:
      self.opt_state = phase.built.init_opt(self.params)
    else:
      opt = jax.eval_shape(phase.program.init_optimizer, phase.program.params)
      self.opt_state = jax.device_put(_as_dtypes(self.opt_state, opt), phase.built.opt_shardings)
    self.grads.place(phase.grad_shardings)
    self.current = planned

  def training_state(self) -> tuple:
    """(params, optimizer state, accumulated gradients): what the devices hold for this model."""
    return self.params, self.opt_state, self.grads.grads

  # -- torch <-> JAX -------------------------------------------------------------------------
  def _read_torch(self) -> None:
    self.params = jax.device_put(_as_dtypes(self.bridges.io.from_torch(), self.phase.program.params),
                                 self.phase.param_shardings)

  def sync_to_torch(self) -> None:
    """Writes the trained parameters into the torch module (if it holds older values)."""
    self.mirror.ensure_torch_current()

  def _check_trainable(self):
    with internal():
      changed = [n for n, p in self.mirror.params.items() if p.requires_grad != self._requires_grad[n]]
    if changed:
      raise UnsupportedUsageError(
          f"requires_grad of {changed[:3]} changed to {not self._requires_grad[changed[0]]} after ap-xla "
          "took the model over; the compiled "
          "program trains the parameters that were trainable at the first training call. Freeze "
          "or unfreeze parameters before the first training forward.")

  # -- the training calls --------------------------------------------------------------------
  def training_forward(self, call: Call, mixed_precision: bool = False):
    """The forward of a training call: loss and gradients in one compiled program."""
    if call.batch_size < 0:
      shapes = {k: tuple(v.shape) for k, v in call.tensors.items()}
      raise ValueError(f"every tensor input of {type(self.model).__name__} must have the batch as "
                       f"its leading dimension, with one size; got {shapes}.")
    self._check_trainable()
    if self.bridges.check_constants():
      self._planned.clear()
    self.mirror.absorb_torch_edits()
    bridge = self.bridges.for_call(call, self.mirror.plain)
    self._activate(self._phase_for(bridge, call, mixed_precision))
    phase = self.phase
    batch = jax.device_put(jax_batch(call), phase.built.batch_shardings)
    loss, grads = phase.built.loss_and_grad(self.params, batch)
    rescale = self._loss_rescale(bridge, call, batch)
    device_memory.note_step(phase.report.chosen.memory_bytes if phase.report else None)
    pending = _Pending(grads, phase, rescale)
    loss_t = out_lib.LossFunction.apply(self.anchor, float(loss) * rescale,
                                        lambda g: self._backward(pending, g))
    version, params = self.mirror.jax_version, self.params

    def compute():
      if self.mirror.jax_version != version:
        raise UnsupportedUsageError(
            "model outputs other than the loss are computed when first read, from the parameters "
            "of their forward; those were changed since (optimizer.step()). Read the outputs "
            "(e.g. outputs.logits) before optimizer.step().")
      return bridge.forward(params, jax_batch(call))

    return self._wrap(bridge, loss_t, compute, call.forced)

  def _loss_rescale(self, bridge: Bridged, call: Call, batch) -> float:
    """weight / num_items_in_batch for the HF loss kwarg (see `adapters.split_loss_kwargs`), else 1."""
    if call.loss_divisor is None:
      return 1.0
    if bridge.weight is None:
      raise UnsupportedUsageError(
          f"{type(self.model).__name__} was called with num_items_in_batch, which makes its loss a sum "
          "divided by it; ap-xla plans the model's own mean loss and rescales it, which needs that "
          "mean to be a ratio of sums it can find in the graph (as a Hugging Face LM loss is). Set "
          "model_accepts_loss_kwargs=False on the Trainer, or compute the loss as a mean.")
    return float(bridge.weight(batch)) / call.loss_divisor

  def _wrap(self, bridge: Bridged, loss_t, compute, forced):
    spec = bridge.out_spec
    lazy = out_lib._Lazy(compute, self.anchor)
    if spec.type is not None and hasattr(spec.type, "to_tuple"):  # a transformers ModelOutput
      return out_lib.TrainingOutputs(loss_t, tuple(spec.context), spec.type, lazy, dict(forced))
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
    grads, pending.grads = pending.grads, None
    if pending.phase is not self.phase:
      grads = jax.device_put(grads, self.phase.grad_shardings)
    self.grads.add(grads, float(grad_output) * pending.rescale)

  def step(self, closure=None):
    """`optimizer.step()`: the compiled update with each param group's lr now."""
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    self.opt.check_groups()
    self.mirror.absorb_torch_edits()
    self.mirror.check_no_torch_grads()
    self.optimizer._opt_called = True  # what torch's step wrapper records for LR schedulers
    if self.grads.grads is None:  # no parameter has a gradient: torch skips them all
      return loss
    lrs = phase_lib.group_lrs(self.optimizer)
    self.params, self.opt_state = self.phase.update(self.params, self.opt_state, self.grads.grads, lrs,
                                                    self.grads.pending_scale)
    self.mirror.jax_changed()
    self.steps += 1
    return loss

  def zero_grad(self, set_to_none: bool = True) -> None:
    """`optimizer.zero_grad()`: clears the accumulator (zeros when set_to_none=False)."""
    self.grads.clear(set_to_none, self.params)

  # -- calls without gradients ---------------------------------------------------------------
  def forward_only(self, model, args, kwargs):
    """A call without gradients: the bridged forward in JAX, or the torch module on synced weights."""
    if self.bridges.check_constants():
      self._planned.clear()
    self.mirror.absorb_torch_edits()
    call = None
    if model.training:
      try:
        call = bind_call(model, args, kwargs)
      except (TypeError, UnsupportedUsageError):
        call = None
    usable = call is not None and not call.forced and call.loss_divisor is None
    bridge = self.bridges.find(call) if usable else None
    if bridge is None:
      reason = "eval mode" if not model.training else "inputs other than the training call's"
      if reason not in self._eager_logged:
        self._eager_logged.add(reason)
        log.info("ap-xla: forward without gradients in %s runs the torch module on the trained "
                 "weights (not compiled).", reason)
      self.mirror.ensure_torch_current()
      return self._original_call(model, *args, **kwargs)
    outs = bridge.forward(self.params, jax_batch(call))
    return out_lib.rebuild(outs, bridge.out_spec.type)

  # -- the optimizer state ---------------------------------------------------------------------
  def _torch_optimizer_state(self) -> dict:
    return optim_state.export_state(self.opt_state, self.grad_names, self.mirror.params)

  def _load_optimizer_state(self, torch_state: dict) -> None:
    """Reads torch's optimizer state (a checkpoint being resumed) into the optax state."""
    if not torch_state:
      return
    state = optim_state.import_state(self.opt_state, self.grad_names, self.mirror.params, torch_state)
    self.opt_state = jax.device_put(state, self.phase.built.opt_shardings)
    log.info("ap-xla: read the torch optimizer state (%d parameters) into the compiled update.",
             len(torch_state))

  def restore_state(self, params: PyTree, opt_state: PyTree, step: int) -> None:
    """Replaces the training state by a restored one (`checkpoints.load_checkpoint`).

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
    self.opt.release()

  def __repr__(self):
    return f"Session({type(self.model).__name__}, {self.phase.plan if self.phase else None}, steps={self.steps})"
