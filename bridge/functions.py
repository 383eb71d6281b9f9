"""The JAX functions of a captured graph: the flat loss, pre / block / post, and forward.

Every function seeds an environment (graph node -> value) with its inputs, then runs its
piece of the graph with `lowering.evaluate`. Buffers and lifted constants are closed over
(zeros of the right shape, made at trace time, for a model on the meta device: such a
program is for planning, not for numbers).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import torch
from torch.utils import _pytree as torch_pytree

from bridge.blocks import BlockSplit, ancestors
from bridge.capture import Captured
from bridge.lowering import bind_symbols, evaluate, to_jax

PyTree = Any
aten = torch.ops.aten


class GraphFunctions:
  """Builds the JAX callables of one captured graph.

  Args:
    captured: the captured graph.
    canonical: torch parameter name -> first name of its tensor (ties).
  """

  def __init__(self, captured: Captured, canonical: dict[str, str]):
    self.captured = captured
    self.canonical = canonical
    self.nodes = [n for n in captured.graph.nodes if n.op == "call_function"]
    self.loss_nodes = ancestors([captured.loss], stop=set(), nodes=self.nodes)
    self.output_nodes = ancestors([captured.loss, *captured.outputs], stop=set(), nodes=self.nodes)
    self._constants = {node: to_jax(captured.constant_values[name])
                       for node, name in captured.constants.items()}

  def used_params(self, pieces: list) -> dict:
    """Placeholder -> torch name of the trainable parameters the given nodes read."""
    out = {}
    for n in pieces:
      for a in n.all_input_nodes:
        if a in self.captured.params:
          out[a] = self.captured.params[a]
    return out

  # -- environments ---------------------------------------------------------------------
  def _env(self) -> dict:
    env = {}
    for node, value in self._constants.items():
      env[node] = jnp.zeros(value.shape, value.dtype) if isinstance(value, jax.ShapeDtypeStruct) else value
    return env

  def _feed_batch(self, env: dict, batch) -> list:
    pairs = []
    for key, node in self.captured.inputs.items():
      if key not in batch:
        raise ValueError(f"batch has no {key!r}; the program was captured with keys "
                         f"{sorted(self.captured.inputs)}. Pass the same keys as example_batch.")
      env[node] = jnp.asarray(batch[key])
      pairs.append((node.meta["val"], env[node]))
    return pairs

  def _feed_params(self, env: dict, placeholders: dict, params: dict, key=None) -> None:
    for node, name in placeholders.items():
      env[node] = params[key(name) if key else self.canonical[name]]

  # -- the flat program ------------------------------------------------------------------
  def flat_loss(self) -> Callable:
    """`loss(params, batch)` with params keyed by (first) torch name."""
    placeholders = self.used_params(self.loss_nodes)

    def loss(params, batch):
      env = self._env()
      pairs = self._feed_batch(env, batch)
      self._feed_params(env, placeholders, params)
      evaluate(self.loss_nodes, env, bind_symbols(pairs))
      return env[self.captured.loss]

    loss.__qualname__ = "bridged_loss"
    return loss

  def forward(self) -> Callable:
    """`forward(flat_params, batch) -> (loss, outputs)`; outputs rebuilt as the model returns them."""
    placeholders = self.used_params(self.output_nodes)
    spec = self.captured.out_spec

    def forward(params, batch):
      env = self._env()
      pairs = self._feed_batch(env, batch)
      self._feed_params(env, placeholders, params)
      evaluate(self.output_nodes, env, bind_symbols(pairs))
      outs = [env[n] for n in self.captured.outputs]
      return env[self.captured.loss], unflatten_outputs(outs, spec)

    return forward

  def loss_weight(self) -> Callable | None:
    """`weight(batch)` when the loss is a ratio of two sums and the divisor reads no parameter.

    A Hugging Face LM loss is `sum(token losses) / count(labelled tokens)`: a mean over the
    labelled tokens, not over the examples, so a batch cut into pieces (gradient
    accumulation) must weigh each piece's loss by its count (`passes.program.Program.loss_weight`).
    Found from the graph's structure: the loss node is `div(a, b)` with `a` and `b` sums
    (through casts) and `b` computed from the batch alone. None for any other loss (then a
    mean over the examples is assumed).
    """
    loss = self.captured.loss
    if loss.target is not aten.div.Tensor or len(loss.args) != 2:
      return None
    num, den = loss.args
    if not all(isinstance(n, torch.fx.Node) and _is_sum(n) for n in (num, den)):
      return None
    den_nodes = ancestors([den], stop=set(), nodes=self.nodes)
    if self.used_params(den_nodes):
      return None
    reads_batch = any(a in self.captured.inputs.values() for n in den_nodes for a in n.all_input_nodes)
    if not reads_batch:
      return None

    def weight(batch):
      env = self._env()
      pairs = self._feed_batch(env, batch)
      evaluate(den_nodes, env, bind_symbols(pairs))
      return env[den]

    weight.__qualname__ = "bridged_loss_weight"
    return weight

  # -- the block form --------------------------------------------------------------------
  def layers(self, split: BlockSplit) -> tuple[Callable, Callable, Callable]:
    """`pre(p, batch) -> (hidden, aux)`, `block(p, hidden, aux) -> hidden`, `post(p, hidden, aux, batch)`."""
    aux_keys = [a.name for a in split.aux]

    def pre(params, batch):
      env = self._env()
      pairs = self._feed_batch(env, batch)
      self._feed_params(env, split.pre_params, params)
      evaluate(split.pre_nodes, env, bind_symbols(pairs))
      hidden = env[split.hidden_in]
      size = hidden.shape[0]
      aux = {}
      for key, node, batched in zip(aux_keys, split.aux, split.aux_batched):
        value = jnp.asarray(env[node])
        # Side inputs without a batch dimension (rotary tables) are broadcast so that
        # every aux leaf can be split into micro-batches with the hidden state.
        aux[key] = value if batched else jnp.broadcast_to(value[None], (size,) + value.shape)
      return hidden, aux

    def block(params, hidden, aux):
      env = self._env()
      self._feed_params(env, split.block_param_nodes, params, key=lambda rel: rel)
      env[split.hidden_in] = hidden
      pairs = [(split.hidden_in.meta["val"], hidden)]
      for key, node, batched in zip(aux_keys, split.aux, split.aux_batched):
        env[node] = aux[key] if batched else aux[key][0]
        if batched:
          pairs.append((node.meta["val"], aux[key]))
      evaluate(split.block_nodes, env, bind_symbols(pairs))
      return env[split.hidden_out].astype(hidden.dtype)

    def post(params, hidden, aux, batch):
      del aux  # post recomputes the pre values it reads from the batch
      env = self._env()
      pairs = self._feed_batch(env, batch)
      self._feed_params(env, split.post_params, params)
      env[split.last_out] = hidden
      pairs.append((split.last_out.meta["val"], hidden))
      evaluate(split.post_nodes, env, bind_symbols(pairs))
      return env[self.captured.loss]

    pre.__qualname__, block.__qualname__, post.__qualname__ = "bridged_pre", "bridged_block", "bridged_post"
    return pre, block, post


_CASTS = ("_to_copy", "to", "convert_element_type", "clone", "view", "squeeze", "reshape")


def _is_sum(node) -> bool:
  """Whether `node` is a full sum (aten.sum), possibly behind casts and reshapes."""
  while node.op == "call_function":
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if name == "sum":
      return True
    if name not in _CASTS or not node.args or not isinstance(node.args[0], torch.fx.Node):
      return False
    node = node.args[0]
  return False


def unflatten_outputs(leaves: list, spec) -> PyTree:
  """The model outputs as returned by torch, with JAX leaves; a ModelOutput becomes a dict."""
  out = torch_pytree.tree_unflatten(leaves, spec)
  if hasattr(out, "keys") and hasattr(out, "to_tuple"):  # transformers ModelOutput
    return {k: out[k] for k in out.keys()}
  return out
