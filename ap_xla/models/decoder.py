"""What the decoders in `ap_xla.models` share: the next-token loss, the `{'pre','blocks','post'}`
parameter stack, the token batch and the `Layers` around flax modules."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from passes.program import Layers, Program


def next_token_loss(logits, tokens):
  """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]."""
  logits = logits[:, :-1].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def init_stack(embed: nn.Module, block: nn.Module, head: nn.Module, *, seq: int, dim: int, layers: int,
               key, aux=None, abstract: bool = False):
  """Initial `{'pre','blocks','post'}` params (the blocks stacked on a leading axis of `layers`).

  `aux` is what a block takes beside its input (e.g. rotary tables); `abstract=True` gives shapes only.
  """
  tokens = jnp.zeros((1, seq), jnp.int32)
  h = jnp.zeros((1, seq, dim), jnp.float32)

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    blocks = jax.vmap(lambda k: block.init(k, h, aux)["params"])(jax.random.split(k2, layers))
    return {"pre": embed.init(k1, tokens)["params"], "blocks": blocks, "post": head.init(k3, h)["params"]}

  return jax.eval_shape(init, key) if abstract else jax.jit(init)(key)


def token_batch(vocab: int, seq: int, batch: int, key, abstract: bool = False):
  """A batch of random tokens `{'tokens': int32[batch, seq]}`; `abstract=True` gives its shape only."""
  if abstract:
    return {"tokens": jax.ShapeDtypeStruct((batch, seq), jnp.int32)}
  return {"tokens": jax.random.randint(key, (batch, seq), 0, vocab, jnp.int32)}


def decoder_layers(embed: nn.Module, block: nn.Module, head: nn.Module,
                   make_aux: Callable | None = None) -> Layers:
  """The `Layers` of embed -> blocks -> head -> next-token loss; `make_aux(tokens)` gives the blocks' aux."""

  def pre(p, batch):
    tokens = batch["tokens"]
    return embed.apply({"params": p}, tokens), (make_aux(tokens) if make_aux else None)

  def blk(p, h, aux):
    return block.apply({"params": p}, h, aux)

  def post(p, h, aux, batch):
    return next_token_loss(head.apply({"params": p}, h), batch["tokens"])

  return Layers(pre=pre, block=blk, post=post)


def decoder_program(params, batch, layers: Layers, optimizer, name: str) -> Program:
  """A `Program` of a decoder's params, batch and layers (AdamW at 1e-3 when `optimizer` is None)."""
  return Program(params=params, batch=batch, optimizer=optimizer if optimizer is not None else optax.adamw(1e-3),
                 layers=layers, name=name)
