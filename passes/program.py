"""The training program the search pass consumes.

A `Program` is a pure JAX training problem: parameters, a loss, an optax optimizer and an
example batch. Optionally it exposes its layer structure as `Layers` (pre -> a stack of
identical blocks with stacked weights run by scan -> post), which per-block recomputation
and pipelining need, and which of its parameters are trained (`trainable`): the others are
frozen, held and sharded like any parameter but given no gradient and no optimizer state.

Trees split by `trainable` (`partition`, `combine`) keep the parameters' structure with None
in place of the other side's leaves (an empty subtree to jax and optax), so gradients and the
optimizer state are trees of the trainable leaves alone, keyed by the same paths.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

# Keys of the parameter dict of a program with `Layers`.
PRE, BLOCKS, POST = "pre", "blocks", "post"


@dataclasses.dataclass(frozen=True)
class Layers:
  """A model written as pre -> scan(block, stacked weights) -> post.

  Attributes:
    pre: `pre(pre_params, batch) -> (hidden, aux)`. `hidden` is an array whose leading
      dimension is the batch; `aux` is a pytree of side inputs every block reads (masks,
      rotary tables), each leaf with the batch as leading dimension (broadcast it), or None.
    block: `block(block_params, hidden, aux) -> hidden`, for the weights of one block
      (the stacked weights indexed on their leading axis).
    post: `post(post_params, hidden, aux, batch) -> loss`, a scalar mean over the batch.
  """
  pre: Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]]
  block: Callable[[PyTree, jax.Array, PyTree], jax.Array]
  post: Callable[[PyTree, jax.Array, PyTree, PyTree], jax.Array]

  def __repr__(self):
    return f"Layers(pre={_name(self.pre)}, block={_name(self.block)}, post={_name(self.post)})"


def _name(f) -> str:
  return getattr(f, "__qualname__", None) or type(f).__name__


def scan_blocks(block: Callable, blocks: PyTree, hidden: jax.Array, aux: PyTree) -> jax.Array:
  """Runs `block` over the stacked weights `blocks` with `lax.scan` (compile time flat in depth)."""
  def body(h, p):
    return block(p, h, aux), None
  hidden, _ = jax.lax.scan(body, hidden, blocks)
  return hidden


@dataclasses.dataclass(frozen=True)
class Program:
  """A pure JAX training program.

  Attributes:
    params: parameter pytree of arrays or `jax.ShapeDtypeStruct`s. With `layers`, a dict
      `{'pre': ..., 'blocks': ..., 'post': ...}` whose 'blocks' leaves are stacked on a
      leading axis of length `num_blocks`.
    optimizer: an `optax.GradientTransformation`.
    batch: an example batch (arrays or `ShapeDtypeStruct`s); every leaf has the global
      batch as its leading dimension.
    loss_fn: `loss_fn(params, batch) -> scalar`. Optional when `layers` is given.
    layers: the optional layer structure.
    name: a label for logs.
    trainable: optional pytree of bools with the structure of `params`, or a prefix of it
      (`{'pre': False, 'blocks': True, 'post': True}`): which leaves are trained. The others
      are frozen (a fine-tuned model's base weights): in the loss and sharded like any
      parameter, never differentiated, updated or given optimizer state. None: all are
      trained. Normalized to the full tree, or to None when every leaf is trained.
    loss_weight: optional `loss_weight(batch) -> scalar`, a function of the batch alone, for
      a loss that is a mean over something other than the examples (an LM loss over its
      labelled tokens): the loss of a batch cut into pieces is then sum_i w_i loss_i / sum_i w_i
      with w_i = loss_weight(piece_i), which is what gradient accumulation computes (a piece
      of weight 0 counts for nothing). None: the loss is a mean over the examples, and
      pieces of equal size weigh the same.

  Example:
    >>> prog = Program(params=params, optimizer=optax.adamw(1e-3), batch=batch,
    ...                loss_fn=lambda p, b: jnp.mean((mlp(p, b['x']) - b['y']) ** 2))
  """
  params: PyTree
  optimizer: optax.GradientTransformation
  batch: PyTree
  loss_fn: Callable[[PyTree, PyTree], jax.Array] | None = None
  layers: Layers | None = None
  name: str = "program"
  loss_weight: Callable[[PyTree], jax.Array] | None = None
  trainable: PyTree | None = None

  def __post_init__(self):
    if self.loss_fn is None and self.layers is None:
      raise ValueError("Program needs `loss_fn` or `layers`, got neither. Pass "
                       "loss_fn=lambda params, batch: ... or a Layers(pre, block, post).")
    if self.loss_fn is not None and not callable(self.loss_fn):
      raise TypeError(f"Program.loss_fn must be callable, got {type(self.loss_fn).__name__}.")
    if self.loss_weight is not None and not callable(self.loss_weight):
      raise TypeError(f"Program.loss_weight must be callable as loss_weight(batch) or None, got "
                      f"{type(self.loss_weight).__name__}.")
    if not (hasattr(self.optimizer, "init") and hasattr(self.optimizer, "update")):
      raise TypeError("Program.optimizer must be an optax.GradientTransformation (with init and "
                      f"update), got {type(self.optimizer).__name__}.")
    if self.layers is not None:
      if not isinstance(self.params, dict) or set(self.params) != {PRE, BLOCKS, POST}:
        keys = sorted(self.params) if isinstance(self.params, dict) else type(self.params).__name__
        raise ValueError("Program.params must be a dict with keys 'pre', 'blocks', 'post' when "
                         f"`layers` is given, got {keys}.")
      leaves = jax.tree.leaves(self.params[BLOCKS])
      if not leaves:
        raise ValueError("Program.params['blocks'] has no arrays; a block stack needs stacked weights.")
      depths = {l.shape[0] if l.ndim else None for l in leaves}
      if len(depths) != 1 or None in depths:
        raise ValueError("Every leaf of Program.params['blocks'] must be stacked on a leading axis of "
                         f"the same length (the number of blocks); got leading sizes {sorted(map(str, depths))}.")
    self.batch_size  # validates the batch
    object.__setattr__(self, "trainable", _normalize_mask(self.trainable, self.params))

  @property
  def batch_size(self) -> int:
    sizes = {l.shape[0] if l.ndim else None for l in jax.tree.leaves(self.batch)}
    if not sizes or None in sizes or len(sizes) != 1:
      raise ValueError("Every leaf of Program.batch must have the global batch as its leading "
                       f"dimension; got leading sizes {sorted(map(str, sizes))}.")
    return sizes.pop()

  @property
  def num_blocks(self) -> int:
    """Depth of the block stack (0 without `layers`)."""
    if self.layers is None:
      return 0
    return jax.tree.leaves(self.params[BLOCKS])[0].shape[0]

  @property
  def num_params(self) -> int:
    return sum(int(l.size) for l in jax.tree.leaves(self.params))

  @property
  def has_frozen(self) -> bool:
    """Whether some parameters are frozen (`trainable`)."""
    return self.trainable is not None

  @property
  def trainable_mask(self) -> PyTree:
    """`trainable` as a full tree of bools (all True when nothing is frozen)."""
    if self.trainable is None:
      return jax.tree.map(lambda _: True, self.params)
    return self.trainable

  @property
  def num_trainable_params(self) -> int:
    return sum(int(l.size) for l in jax.tree.leaves(self.split(self.params)[0]))

  def split(self, tree: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, frozen) parts of a tree structured like the params (see `partition`)."""
    return partition(tree, self.trainable_mask)

  def init_optimizer(self, params: PyTree) -> PyTree:
    """The optimizer state of `params`: of their trainable leaves only."""
    return self.optimizer.init(self.split(params)[0])

  def loss(self, params: PyTree, batch: PyTree) -> jax.Array:
    """The single-device reference loss."""
    if self.layers is None:
      return self.loss_fn(params, batch)
    hidden, aux = self.layers.pre(params[PRE], batch)
    hidden = scan_blocks(self.layers.block, params[BLOCKS], hidden, aux)
    return self.layers.post(params[POST], hidden, aux, batch)

  def abstract(self) -> "Program":
    """The same program with every array replaced by its `jax.ShapeDtypeStruct`."""
    return dataclasses.replace(self, params=abstractify(self.params), batch=abstractify(self.batch))

  def __repr__(self):
    frozen = f", trainable={self.num_trainable_params:,}" if self.has_frozen else ""
    return (f"Program(name={self.name!r}, params={self.num_params:,}{frozen}, batch={self.batch_size}, "
            f"blocks={self.num_blocks})")


def partition(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits `tree` by a bool `mask` of its structure (leaves of `tree` may be any objects,
  e.g. PartitionSpecs) into (selected, the rest), each with None in place of the other's.

  Example:
    >>> partition({'w': w, 'b': b}, {'w': True, 'b': False})
    ({'w': w, 'b': None}, {'w': None, 'b': b})
  """
  treedef = jax.tree.structure(mask)
  leaves, flags = treedef.flatten_up_to(tree), treedef.flatten_up_to(mask)
  return (treedef.unflatten([x if m else None for x, m in zip(leaves, flags)]),
          treedef.unflatten([None if m else x for x, m in zip(leaves, flags)]))


def combine(selected: PyTree, rest: PyTree) -> PyTree:
  """The inverse of `partition`: each leaf from whichever side holds it."""
  return jax.tree.map(lambda a, b: b if a is None else a, selected, rest, is_leaf=lambda x: x is None)


def _normalize_mask(mask: PyTree | None, params: PyTree) -> PyTree | None:
  """The full bool tree of `mask` (a tree or prefix of `params`), or None when all are True.

  Raises:
    ValueError: `mask` is not a prefix of `params`, has non-bool leaves, or trains nothing.
  """
  if mask is None:
    return None
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
  except (ValueError, TypeError) as e:
    raise ValueError(f"Program.trainable must be a tree of bools with the structure of params (or a "
                     f"prefix of it); got {jax.tree.structure(mask)} for params "
                     f"{jax.tree.structure(params)}.") from e
  flags = jax.tree.leaves(full)
  bad = [m for m in flags if not isinstance(m, (bool, np.bool_))]
  if bad:
    raise ValueError(f"Program.trainable leaves must be True (trained) or False (frozen), got "
                     f"{bad[0]!r} ({type(bad[0]).__name__}).")
  if not any(flags):
    raise ValueError("Program.trainable freezes every parameter: there is nothing to train. Mark "
                     "at least one leaf True (or pass trainable=None to train them all).")
  if all(flags):
    return None
  return jax.tree.map(bool, full)


def abstractify(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def is_abstract(tree: PyTree) -> bool:
  return any(isinstance(l, jax.ShapeDtypeStruct) for l in jax.tree.leaves(tree))
