"""`bridge_model`: a torch nn.Module (+ optimizer) -> the JAX training program the pass consumes.

Capture with torch.export, lower with torchax's op table, find the block stack and emit
`Program(layers=Layers(pre, block, post))` with params `{'pre', 'blocks' (stacked), 'post'}`;
without a block stack, a flat `Program(loss_fn=...)` (pipelining is then unavailable, and
the log says why).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import optax
import torch

from bridge import optim, state
from bridge.blocks import BlockSplit, find_blocks
from bridge.capture import Captured, capture, split_batch
from bridge.functions import GraphFunctions
from bridge.lowering import check_supported, to_jax
from passes.program import BLOCKS, POST, PRE, Layers, Program, partition

log = logging.getLogger("bridge")

PyTree = Any


@dataclasses.dataclass(frozen=True, repr=False)
class BridgedModel:
  """A torch model bridged to JAX.

  Attributes:
    program: the `passes.program.Program` (params keyed by torch names; `program.batch`
      is the example batch's tensors as JAX arrays).
    param_names: pytree like `program.params`; each leaf is the torch name of that leaf,
      or for a stacked block leaf the tuple of the L names along its leading axis. Frozen
      (`requires_grad=False`) parameters are leaves too, marked untrained in
      `program.trainable`.
    structure_log: how the model was cut (or why it stays flat), one line each.
    split: the `BlockSplit`, or None for a flat program.
    tied: first torch name -> all names, for tensors with several names.
    model: the torch module (updated in place by `to_torch`).
  """
  program: Program
  param_names: PyTree
  structure_log: tuple[str, ...]
  split: BlockSplit | None
  tied: dict
  model: torch.nn.Module
  captured: Captured
  _forward: Callable

  @property
  def trainable_names(self) -> PyTree:
    """`param_names` with None at the frozen leaves: the structure of the gradients and of
    the optimizer state."""
    return partition(self.param_names, self.program.trainable_mask)[0]

  @property
  def has_layers(self) -> bool:
    return self.program.layers is not None

  def from_torch(self) -> PyTree:
    """The current torch parameters, in the structure of `program.params`."""
    return state.read_params(self.model, self.param_names)

  def to_torch(self, params: PyTree) -> None:
    """Writes `params` (JAX, structured like `program.params`) into the torch module in place."""
    state.write_params(self.model, self.param_names, params)

  def forward(self, params: PyTree, batch: Mapping[str, Any]) -> PyTree:
    """The model outputs for `batch` (a ModelOutput comes back as a dict of arrays)."""
    tensors = {k: v for k, v in batch.items() if k in self.captured.inputs}
    return self._forward(state.by_torch_name(params, self.param_names), tensors)[1]

  def __repr__(self):
    s = self.split
    where = (f"blocks={s.num_blocks} x {s.block_class} at {s.container!r}" if s else "blocks=None (flat)")
    return f"BridgedModel(model={type(self.model).__name__}, params={self.program.num_params:,}, {where})"


def bridge_model(model: torch.nn.Module, example_batch: Mapping[str, Any],
                 optimizer: torch.optim.Optimizer | optax.GradientTransformation | None = None,
                 scheduler: Any = None, loss_fn: Callable | None = None, *,
                 find_stack: bool = True, name: str | None = None) -> BridgedModel:
  """Bridges a torch model and its optimizer to a JAX `Program`.

  Args:
    model: the torch module; on the meta device its params come back as ShapeDtypeStructs.
    example_batch: dict of model inputs (and labels), tensors leading with the batch;
      non-tensor entries (`use_cache=False`) are passed to the model as constants.
    optimizer: a torch.optim optimizer over the model's parameters (mapped exactly by
      `bridge.optim.optax_from_torch`), or an optax GradientTransformation. Required.
    scheduler: optional torch LR scheduler of `optimizer`.
    loss_fn: optional torch `loss_fn(outputs, batch) -> scalar`; by default the loss is
      `outputs.loss` or `outputs[0]`.
    find_stack: look for a block stack (False: always a flat program).
    name: label of the program (default: the model's class name).

  Returns:
    A `BridgedModel`.

  Raises:
    ValueError: no optimizer, or a scheduler with an optax optimizer.
    bridge.lowering.UnsupportedOperatorError: an ATen op without a JAX lowering.

  Example:
    >>> model = LlamaForCausalLM(config)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> bridged = bridge_model(model, {'input_ids': ids, 'labels': ids, 'use_cache': False}, opt)
    >>> loss, grads = jax.value_and_grad(bridged.program.loss)(bridged.program.params,
    ...                                                       bridged.program.batch)
  """
  if optimizer is None:
    raise ValueError("bridge_model needs optimizer=: a torch.optim optimizer built on "
                     "model.parameters() (mapped exactly to optax), or an optax "
                     "GradientTransformation such as optax.adamw(1e-3, weight_decay=0.01).")
  is_optax = hasattr(optimizer, "init") and hasattr(optimizer, "update") and not isinstance(
      optimizer, torch.optim.Optimizer)
  if not is_optax and not isinstance(optimizer, torch.optim.Optimizer):
    raise TypeError(f"optimizer must be a torch.optim.Optimizer or an optax GradientTransformation, "
                    f"got {type(optimizer).__name__}.")
  if is_optax and scheduler is not None:
    raise ValueError("scheduler= is for torch optimizers; with an optax optimizer put the schedule "
                     "in it (e.g. optax.adamw(optax.cosine_decay_schedule(...))).")

  captured = capture(model, example_batch, loss_fn=loss_fn)
  fns = GraphFunctions(captured, state.canonical_names(model))
  check_supported(fns.output_nodes)
  lines = list(captured.log)

  split = None
  if find_stack:
    split, notes = find_blocks(captured, model, fns.canonical)
    lines += notes
  else:
    lines.append("block search off (find_stack=False)")
  if split is None:
    lines.append("no block stack: flat program (pipelining and per-block recomputation unavailable)")

  unused = sorted(set(fns.canonical.values()) - {fns.canonical[n] for n in fns.used_params(fns.loss_nodes).values()}
                  - {n for n, p in model.named_parameters() if not p.requires_grad})
  requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
  if split is not None:
    mixed = [names for names in split.block_params.values() if len({requires_grad[n] for n in names}) > 1]
    if mixed:
      lines.append(f"the blocks' {mixed[0][0].rsplit('.', 1)[-1]} (and {len(mixed) - 1} more) are frozen in "
                   f"some layers and trained in others ({', '.join(mixed[0][:3])}...): a stacked weight "
                   "is trained or frozen as a whole, so the program stays flat (freeze whole weights "
                   "across all layers to keep the block stack)")
      split = None
  if unused:
    lines.append(f"parameters the loss does not read are left out (torch skips them too): {unused[:5]}"
                 + (" ..." if len(unused) > 5 else ""))

  if split is not None:
    names = {PRE: _names(split.pre_params, fns.canonical), BLOCKS: dict(split.block_params),
             POST: _names(split.post_params, fns.canonical)}
    shared = sorted(set(names[PRE]) & set(names[POST]))
    if shared:
      lines.append(f"tied weights read before and after the blocks, kept in 'pre' and 'post' with "
                   f"summed gradients: {shared}")
    pre, block, post = fns.layers(split)
    build = dict(layers=Layers(pre=pre, block=block, post=post))
  else:
    names = _names(fns.used_params(fns.loss_nodes), fns.canonical)
    build = dict(loss_fn=fns.flat_loss())

  trainable = jax.tree.map(lambda leaf: all(requires_grad[n] for n in (leaf if state.is_stacked(leaf) else (leaf,))),
                           names, is_leaf=state.is_stacked)
  if not any(jax.tree.leaves(trainable)):
    raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True that the loss "
                     "reads: there is nothing to train. Unfreeze the weights to train "
                     "(p.requires_grad_(True)) before the first training call.")
  frozen = [n for n, t in zip(jax.tree.leaves(names, is_leaf=state.is_stacked), jax.tree.leaves(trainable)) if not t]
  if frozen:
    lines.append(f"{len(frozen)} frozen (requires_grad=False) parameter leaves held and sharded like the "
                 f"others, with no gradient or optimizer state: {[f if isinstance(f, str) else f[0] for f in frozen[:3]]}"
                 + (" ..." if len(frozen) > 3 else ""))
  tx = training_transform(optimizer, model, partition(names, trainable)[0], scheduler)

  tensors, _ = split_batch(example_batch)
  batch = {k: to_jax(v) for k, v in tensors.items()}
  params = state.read_params(model, names)
  weight = fns.loss_weight()
  if weight is not None:
    lines.append("the loss is a mean over what its divisor counts (e.g. labelled tokens): micro-batches "
                 "are weighted by it")
  program = Program(params=params, optimizer=tx, batch=batch, name=name or type(model).__name__,
                    loss_weight=weight, trainable=trainable, **build)
  for line in lines:
    log.info("%s: %s", program.name, line)
  if split is None and find_stack:
    log.warning("%s: no block stack found; pipelining is unavailable (see structure_log)", program.name)
  return BridgedModel(program=program, param_names=names, structure_log=tuple(lines), split=split,
                      tied=state.tied_names(model), model=model, captured=captured,
                      _forward=jax.jit(fns.forward()))


def _names(placeholders: dict, canonical: dict) -> dict[str, str]:
  order = {name: i for i, name in enumerate(canonical)}
  return {canonical[n]: canonical[n] for n in sorted(placeholders.values(), key=order.__getitem__)}


def training_transform(optimizer, model: torch.nn.Module, names: PyTree,
                       scheduler: Any = None) -> optax.GradientTransformation:
  """The optax transform of a bridged program whose params are named by `names`.

  A torch optimizer is mapped by `bridge.optim.optax_from_torch` (an optax one is used as
  is); when a tensor is kept in several leaves (ties), their gradients are summed first.
  `bridge_model` builds its program's optimizer with it; so does a checkpoint restore that
  needs the optimizer state's structure before the model is bridged.
  """
  if isinstance(optimizer, torch.optim.Optimizer):
    tx = optim.optax_from_torch(optimizer, state.group_tree(optimizer, model, names), scheduler=scheduler)
  else:
    tx = optimizer
  tied_sum = state.sum_tied_gradients(names)
  return tx if tied_sum is None else optax.chain(tied_sum, tx)
