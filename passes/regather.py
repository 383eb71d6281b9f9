"""FSDP's re-gather in the backward without recomputation (PyTorch FSDP's reshard_after_forward).

Differentiated as written, a block whose weights FSDP gathers before use keeps every layer's
gathered weights for the backward (the matmuls' residuals): measured on XLA:CPU and on XLA:GPU
compiled without a device, the L layers' gathered weights stay live from the forward to the
backward. `regathering_block` runs the block under its ordinary vjp, so it keeps exactly the
residuals it keeps without FSDP (the fused attention's own recomputation included), except the
gathered weights: the backward gathers them again from the stored shards.

A checkpoint policy cannot do this: `save_anything_except_these_names` saves the gather's own
result in the name's place, and an outer policy overrides the ones of checkpoints nested inside
the block (the chunked attention's scores were then saved: O(s^2), measured).
"""
from __future__ import annotations

from typing import Callable

import jax

from passes.plan import Plan


def regathers(plan: Plan) -> bool:
  """Whether the plan's blocks re-gather their weights in the backward: FSDP over more than one
  rank without pipelining, for the blocks that are not recomputed ('none', and the blocks
  'selective_layer' leaves alone; the other policies recompute the gather with the block)."""
  return plan.fsdp and plan.shard_degree > 1 and plan.pp == 1 and plan.recompute in ("none", "selective_layer")


def regathering_block(block: Callable, prepare: Callable) -> Callable:
  """`(p, h, aux) -> block(prepare(p), h, aux)`, whose backward calls `prepare(p)` again.

  Args:
    block: `(weights, h, aux) -> h`, the block on prepared (gathered, cast) weights.
    prepare: `p -> weights`: the casts and FSDP gathers of the stored shards.
  """
  layout: dict = {}  # set when the forward is traced: the vjp's tree and where the weights sit

  @jax.custom_vjp
  def run(p, h, aux):
    return block(prepare(p), h, aux)

  def fwd(p, h, aux):
    w = prepare(p)
    out, vjp = jax.vjp(block, w, h, aux)
    leaves, tree = jax.tree.flatten(vjp)
    index = {id(x): i for i, x in enumerate(jax.tree.leaves(w))}
    layout["tree"], layout["where"] = tree, [index.get(id(x)) for x in leaves]
    kept = [None if i is not None else x for x, i in zip(leaves, layout["where"])]
    return out, (p, kept)

  def bwd(res, ct):
    p, kept = res
    w, prepare_vjp = jax.vjp(prepare, p)
    wl = jax.tree.leaves(w)
    leaves = [wl[i] if i is not None else x for x, i in zip(kept, layout["where"])]
    dw, dh, daux = jax.tree.unflatten(layout["tree"], leaves)(ct)
    return prepare_vjp(dw)[0], dh, daux

  run.defvjp(fwd, bwd)
  return run
