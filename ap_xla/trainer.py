"""The runtime: a plan's sharded training state and its compiled step."""
from __future__ import annotations

import logging
from typing import Any

import jax

from passes.build import build_plan
from passes.devices import check_devices
from passes.plan import Plan
from passes.program import Program, is_abstract
from passes.report import SearchResult
from passes.step import BuiltStep

log = logging.getLogger("ap_xla")
PyTree = Any


class Trainer:
  """Holds the sharded parameters and optimizer state of a plan and runs its step.

  Example:
    >>> trainer = ap_xla.parallelize(program)
    >>> for batch in batches:
    ...   loss = trainer.step(batch)
  """

  def __init__(self, program: Program, plan: Plan, devices=None, report: SearchResult | None = None,
               params: PyTree | None = None, opt_state: PyTree | None = None):
    devices = check_devices(devices)
    params = program.params if params is None else params
    if is_abstract(params):
      raise ValueError("Trainer needs concrete parameters, but the program's params are "
                       "ShapeDtypeStructs; build the Program with real arrays (or pass params=...) "
                       "to train. Abstract programs are for ap_xla.search / planning only.")
    self.program, self.plan, self.devices, self.report = program, plan, devices, report
    self.built: BuiltStep = build_plan(program, plan, devices)
    self.mesh = self.built.mesh
    # A copy: the step donates its inputs, and device_put may alias the caller's buffers
    # (a shard on the same device), which donation would then delete under the caller.
    self.params = jax.tree.map(lambda x: x.copy(), jax.device_put(params, self.built.param_shardings))
    self.opt_state = (self.built.init_opt(self.params) if opt_state is None
                      else jax.device_put(opt_state, self.built.opt_shardings))
    self.step_count = 0
    log.info("Trainer ready: %s on %d devices.", plan, plan.num_devices)

  def _check_batch(self, batch):
    want = jax.tree.structure(self.program.batch)
    if jax.tree.structure(batch) != want:
      raise ValueError(f"the batch does not have the program's structure: "
                       f"{_tree_difference(batch, self.program.batch)}. Pass a batch with the same keys (and "
                       "nesting) as the example batch the Program was built with.")
    sizes = {x.shape[0] for x in jax.tree.leaves(batch) if getattr(x, "ndim", 0)}
    if len(sizes) != 1:
      raise ValueError(f"every batch leaf needs the same leading (batch) size, got {sorted(sizes)}.")
    b = sizes.pop()
    need = self.plan.dp * self.plan.mb
    if b % need:
      raise ValueError(f"batch size {b} does not divide by data parallel x micro-batches = "
                       f"{self.plan.dp} x {self.plan.mb} = {need} of {self.plan}; use a batch that "
                       "is a multiple of it, or re-plan for this batch size.")
    return jax.device_put(batch, self.built.batch_shardings)

  def step(self, batch: PyTree) -> jax.Array:
    """One training step (forward, backward, optimizer update); returns the loss."""
    batch = self._check_batch(batch)
    self.params, self.opt_state, loss = self.built.step(self.params, self.opt_state, batch)
    self.step_count += 1
    return loss

  def loss_and_grad(self, batch: PyTree):
    """Loss and gradients at the current parameters, without updating them."""
    return self.built.loss_and_grad(self.params, self._check_batch(batch))

  # Checkpoints: thin wrappers over ap_xla/checkpoint.py, imported on use (orbax takes ~0.8 s to import).

  def save(self, directory, *, data_position: Any = None, metadata: dict | None = None,
           max_to_keep: int | None = None) -> str:
    """Saves params, optimizer state, step and plan as checkpoint `step_count` (see `checkpoint.save`).

    Example:
      >>> trainer.save('/ckpt', data_position=next_batch_index)
    """
    from ap_xla import checkpoint
    return checkpoint.save(directory, self.step_count, self.params, self.opt_state, plan=self.plan,
                           data_position=data_position, metadata=metadata, max_to_keep=max_to_keep)

  def restore(self, directory, *, step: int | None = None):
    """Loads a checkpoint into this trainer's shardings (it may come from another plan); returns it.

    Example:
      >>> ckpt = trainer.restore('/ckpt')   # latest step
      >>> start = ckpt.data_position
    """
    from ap_xla import checkpoint
    params, opt_state, _ = self.built.abstract_inputs(self.program)
    ckpt = checkpoint.restore(directory, params, opt_state, step=step)
    self.params, self.opt_state, self.step_count = ckpt.params, ckpt.opt_state, ckpt.step
    return ckpt

  def __repr__(self):
    return f"Trainer({self.plan}, steps={self.step_count})"


def _tree_difference(got: PyTree, want: PyTree) -> str:
  """What differs between two pytrees' structures, by key path ('missing key ['labels']', ...)."""
  paths = lambda t: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}
  have, need = paths(got), paths(want)
  parts = [f"missing {', '.join(sorted(need - have))}"] if need - have else []
  parts += [f"unexpected {', '.join(sorted(have - need))}"] if have - need else []
  if not parts:  # same leaf paths, other containers (a tuple for a list, a dict for a dataclass, ...)
    parts = [f"got {jax.tree.structure(got)}, expected {jax.tree.structure(want)}"]
  return "; ".join(parts)
