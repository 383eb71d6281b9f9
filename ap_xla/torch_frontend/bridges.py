"""The bridged programs of one taken-over model, one per input signature.

The first training call bridges the model with its torch optimizer (`bridge.bridge_model`,
built at lr 1: the phase multiplies each group's update by its lr at every step). A later
call with other input names, shapes or constants is bridged again, reusing the optimizer
transform; it must read the same parameters. Buffers are constants of the programs
(`constants.py`): when one changes in torch, every program is dropped and the next call
bridges the model again with the new values. Frozen parameters are untrained parameters of
the programs (`Program.trainable`), not constants.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from typing import Any, Callable

import jax
import optax
import torch

from ap_xla.torch_frontend.calls import Call, describe
from ap_xla.torch_frontend.constants import ConstantWatch, check_no_buffer_updates
from ap_xla.torch_frontend.errors import UnsupportedUsageError
from ap_xla.torch_frontend.sync import internal
from passes.program import abstractify

log = logging.getLogger("ap_xla")
PyTree = Any


def is_name(x) -> bool:
  return isinstance(x, (str, tuple))


def flat_names(names: PyTree) -> list[str]:
  """The torch names of a `param_names` tree, each once, in order."""
  out = []
  for leaf in jax.tree.leaves(names, is_leaf=is_name):
    for n in (leaf if isinstance(leaf, tuple) else (leaf,)):
      if n not in out:
        out.append(n)
  return out


class Bridged:
  """A bridged program for one input signature, with its jitted forward."""

  def __init__(self, key, bridged):
    self.key, self.bridged = key, bridged
    self.program = dataclasses.replace(bridged.program, params=abstractify(bridged.program.params))
    self.forward = jax.jit(bridged.forward)
    self.out_spec = bridged.captured.out_spec
    weight = bridged.program.loss_weight  # the divisor of a mean loss (labelled tokens), if found
    self.weight = jax.jit(weight) if weight is not None else None


class BridgeCache:
  """Bridges `model` per call signature; the first bridge also maps its torch optimizer.

  Args:
    model: the torch module.
    optimizer: its torch optimizer (mapped to optax at the first bridge).
    call: the first training call.
    plain_forward: a context manager factory under which the model runs its own forward
      (no wrapper around it, e.g. accelerate's autocast), for torch.export.
  """

  def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, call: Call,
               plain_forward: Callable[[], Any] = contextlib.nullcontext):
    self.model, self._plain_forward = model, plain_forward
    self._bridges: dict = {}
    # A resumed optimizer holds state (its checkpoint): bridge it fresh; the session reads it in.
    resumed, optimizer.state = optimizer.state, collections.defaultdict(dict)
    try:
      first = self._bridge_first(optimizer, call)
    finally:
      optimizer.state = resumed
    self.first = first
    self.param_names = first.bridged.param_names
    self.tx = first.program.optimizer
    self.io = first.bridged  # reads and writes the torch parameters (any bridge would do)
    self._watch = ConstantWatch(model, [n for n in first.bridged.captured.constant_values
                                        if not n.startswith("<")])

  def _export(self, batch, optimizer):
    from bridge.program import bridge_model
    with self._plain_forward(), torch.autocast("cpu", enabled=False):
      return bridge_model(self.model, batch, optimizer=optimizer)

  def _bridge_first(self, optimizer, call: Call) -> Bridged:
    from bridge.capture import CaptureError, NoLossError
    from bridge.lowering import UnsupportedOperatorError
    from bridge.schedules import UnsupportedTorchOptimError
    saved = [g["lr"] for g in optimizer.param_groups]
    try:
      for g in optimizer.param_groups:
        g["lr"] = 1.0
      with internal():
        bridged = self._export(call.batch, optimizer)
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
      for g, lr in zip(optimizer.param_groups, saved):
        g["lr"] = lr
    check_no_buffer_updates(self.model, bridged.captured.mutated_buffers)
    return self._remember(call, bridged)

  def _remember(self, call: Call, bridged) -> Bridged:
    key = call.shape_key(with_batch=not bridged.captured.dynamic_batch)
    b = Bridged(key, bridged)
    self._bridges[key] = b
    return b

  def find(self, call: Call) -> Bridged | None:
    """The program already bridged for `call`'s signature, or None."""
    for with_batch in (False, True):
      b = self._bridges.get(call.shape_key(with_batch))
      if b is not None:
        return b
    return None

  def for_call(self, call: Call, plain_params: Callable[[], Any]) -> Bridged:
    """The program for `call`, bridged now if needed (`plain_params()`: a context in which the
    parameters are plain `nn.Parameter`s, for torch.export).

    Raises:
      UnsupportedUsageError: the call reads other parameters than the first training call.
    """
    b = self.find(call)
    if b is not None:
      return b
    if self._bridges:  # else they were dropped for new constants, which `check_constants` logged
      log.info("ap-xla: a training call with other inputs or shapes (%s); bridging the model for it.",
               describe(call))
    with plain_params():
      bridged = self._export(call.batch, optax.identity())
    self._watch.record()
    if jax.tree.structure(bridged.param_names, is_leaf=is_name) != jax.tree.structure(
        self.param_names, is_leaf=is_name) or flat_names(bridged.param_names) != flat_names(self.param_names):
      raise UnsupportedUsageError(
          f"the training call with inputs {describe(call)} reads other parameters (or cuts the "
          "model differently) than the first training call; ap-xla keeps one training state per "
          "model. Call the model with the same inputs each step.")
    bridged = dataclasses.replace(bridged, program=dataclasses.replace(bridged.program, optimizer=self.tx))
    return self._remember(call, bridged)

  def check_constants(self) -> bool:
    """Drops every program when a buffer or frozen parameter they baked in changed in torch.

    Returns:
      True if the programs were dropped (the next training call bridges the model again and
      recompiles the current plan for it; no search when its batch fits the plan).
    """
    changed = self._watch.changed()
    if not changed:
      return False
    log.info("ap-xla: %d buffer(s) or frozen parameter(s) of %s changed in torch (e.g. %s); the "
             "compiled programs hold them as constants, so the model is bridged again with the new "
             "values (the plan is kept).", len(changed), type(self.model).__name__, changed[0])
    self._bridges.clear()
    self._watch.record()
    return True
