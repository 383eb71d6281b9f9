"""Activation recomputation policies: which residuals a block keeps for its backward.

`Plan.recompute` names one of:

  none             keep every residual (no recomputation).
  full             keep only the block's input; the backward re-runs the whole block
                   (`jax.checkpoint_policies.nothing_saveable`).
  dots             keep the outputs of the weight matmuls (dot_generals without batch
                   dimensions) and recompute the rest: norms, activations, rotary, attention
                   (`dots_with_no_batch_dims_saveable`).
  selective_op     torchtitan's per-op selective checkpointing (`_apply_op_sac`,
                   `selective_ac_option='op'`): keep the attention's output (its fused
                   kernel's, `ATTENTION_OUT`) and the outputs of the weight matmuls except
                   every second one, counted in program order within the block (Llama:
                   wq, wv, w1, w2 kept; wk, wo, w3 recomputed); recompute everything else.
  selective_layer  torchtitan's per-layer selective checkpointing (`_apply_layer_sac`,
                   `selective_ac_option='2'`): every 2nd block (the 2nd, 4th, ... of the stack,
                   or of a pipeline stage's layers) recomputed fully, the others not at all.

Each is the same function as 'none' (tested for equal loss and gradients); they differ in
memory and FLOPs only. `checkpointed` wraps one block; `layer_runner` runs a stack of blocks
under a policy (`selective_layer` is a property of the stack, not of one block).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.extend.core as jcore
from jax.ad_checkpoint import checkpoint_name

from passes.plan import RECOMPUTE_POLICIES
from passes.program import scan_blocks
from passes.regather import regathering_block

PyTree = Any

# Name of the fused attention's output (`bridge.attention.dot_product_attention` tags it),
# saved by 'selective_op' as torchtitan saves SDPA's.
ATTENTION_OUT = "ap_attention_out"
# Name of the matmul outputs 'selective_op' keeps (given by `_name_every_other_matmul`).
SAC_SAVED = "ap_sac_saved"

POLICIES = RECOMPUTE_POLICIES  # the names Plan validates (passes.plan, which imports no jax)
# Ordered by how much the backward recomputes (its FLOPs), for the staged search.
RECOMPUTE_ORDER = {"none": 0, "dots": 1, "selective_op": 2, "selective_layer": 3, "full": 4}
# Layer frequency of 'selective_layer' (torchtitan's default option '2').
LAYER_SAC_EVERY = 2


def recomputed_fraction(policy: str) -> float:
  """The fraction of blocks whose backward re-runs (part of) their forward: the weights they
  use again, hence under FSDP re-gathered."""
  return {"none": 0.0, "selective_layer": 1.0 / LAYER_SAC_EVERY}.get(policy, 1.0)


def _is_cudnn_attention_fwd(prim) -> bool:
  # jax's cuDNN flash attention: its forward primitive returns the output and the softmax
  # statistics its backward needs; saving them is saving the fused kernel's results.
  return prim.name.startswith("dot_product_attention_fwd")


def _selective_op_policy(prim, *_, **params) -> bool:
  if prim.name == "name":
    return params.get("name") in (SAC_SAVED, ATTENTION_OUT)
  return _is_cudnn_attention_fwd(prim)


_JAX_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "selective_op": _selective_op_policy,
}


def _is_matmul(eqn) -> bool:
  """A weight matmul (torch's mm/linear): a dot_general without batch dimensions."""
  if eqn.primitive.name != "dot_general":
    return False
  (_, _), (lb, rb) = eqn.params["dimension_numbers"]
  return not lb and not rb


_INLINE = ("pjit", "jit", "closed_call", "core_call")


def _eval_naming(jaxpr, consts, args, counter: list):
  """Evaluates `jaxpr`, tagging every other matmul output (1st, 3rd, ...) with SAC_SAVED;
  plain calls are inlined so their matmuls count in order, other higher-order primitives
  (attention's checkpoint, custom derivatives, loops) are bound as they are. Each equation
  runs under its own name stack, as `jax.core.eval_jaxpr` does (the attention's scope,
  `passes.hlo_stats.ATTENTION_SCOPE`, must survive)."""
  from jax._src import source_info_util as siu  # what jax's own eval_jaxpr uses
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    sub = eqn.params.get("jaxpr")
    with siu.user_context(eqn.source_info.traceback,
                          name_stack=siu.current_name_stack() + eqn.source_info.name_stack):
      if eqn.primitive.name in _INLINE and isinstance(sub, jcore.ClosedJaxpr):
        outs = _eval_naming(sub.jaxpr, sub.consts, ins, counter)
      else:
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
          outs = [outs]
        if _is_matmul(eqn):
          counter[0] += 1
          if counter[0] % 2 == 1:
            outs = [checkpoint_name(outs[0], SAC_SAVED)]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _name_every_other_matmul(block_fn: Callable) -> Callable:
  """`block_fn` with its 1st, 3rd, 5th, ... weight matmul outputs named SAC_SAVED (torchtitan
  counts mm calls per block in forward order and recomputes the even ones)."""
  def named(*args):
    closed, out_shape = jax.make_jaxpr(block_fn, return_shape=True)(*args)
    flat = _eval_naming(closed.jaxpr, closed.consts, jax.tree.leaves(args), [0])
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat)
  return named


def checkpointed(block_fn: Callable, policy: str) -> Callable:
  """One block under a per-block policy ('none', 'full', 'dots', 'selective_op').

  Raises:
    ValueError: an unknown policy, or 'selective_layer' (a property of the stack: use
      `layer_runner`).
  """
  if policy == "none":
    return block_fn
  if policy == "selective_op":
    return jax.checkpoint(_name_every_other_matmul(block_fn), policy=_selective_op_policy)
  if policy not in _JAX_POLICIES:
    raise ValueError(f"recomputation policy {policy!r} is not a per-block policy; per-block ones: "
                     f"{('none',) + tuple(_JAX_POLICIES)} ('selective_layer' applies to a stack: layer_runner).")
  return jax.checkpoint(block_fn, policy=_JAX_POLICIES[policy])


def layer_runner(block: Callable, policy: str, prepare: Callable | None = None,
                 regather: bool = False) -> Callable:
  """`run(blocks, hidden, aux) -> hidden`: the stacked blocks under `policy`, by `lax.scan`.

  Args:
    block: `(weights, h, aux) -> h`, one block on its prepared weights.
    policy: a `Plan.recompute` policy.
    prepare: `p -> weights`, a stored block's casts and FSDP gathers (default: none).
    regather: the blocks that are not recomputed run under `passes.regather.regathering_block`
      (their backward prepares the weights again: FSDP's re-gather).

  'selective_layer' scans over groups of LAYER_SAC_EVERY blocks, the last of each group
  under full recomputation (torchtitan's count: blocks k with k % LAYER_SAC_EVERY == 0,
  1-based); blocks left over after the last whole group run without recomputation. Each
  block of a group takes the whole group and picks its own weights out of it inside its
  prepare, so what it keeps for the backward is the scanned group itself, which the scan
  forwards. A block that took its slice of the group kept that slice: a new residual stack,
  a copy of the stored weights, which under FSDP GSPMD even laid out gathered (53.5 MiB of
  temporaries against 18.7 for 'none', 8-layer FSDP-8 test Llama, XLA:CPU). So the group's
  unrecomputed blocks always run under `regathering_block`, which re-slices (and under FSDP
  re-gathers) in the backward.
  """
  prepare = prepare or (lambda p: p)

  def plain(p, h, aux):
    return block(prepare(p), h, aux)
  kept = regathering_block(block, prepare) if regather else plain
  if policy != "selective_layer":
    run_block = checkpointed(kept, policy)
    return lambda blocks, hidden, aux: scan_blocks(run_block, blocks, hidden, aux)
  every = LAYER_SAC_EVERY

  def position(i):
    def pick(group):
      return prepare(jax.tree.map(lambda x: x[i], group))
    if i < every - 1:
      return regathering_block(block, pick)
    return checkpointed(lambda group, h, aux: block(pick(group), h, aux), "full")
  steps = [position(i) for i in range(every)]

  def run(blocks, hidden, aux):
    n = jax.tree.leaves(blocks)[0].shape[0]
    groups = n // every
    if groups:
      grouped = jax.tree.map(lambda x: x[:groups * every].reshape((groups, every) + x.shape[1:]), blocks)

      def body(h, group):
        for f in steps:
          h = f(group, h, aux)
        return h, None
      hidden = jax.lax.scan(body, hidden, grouped)[0]
    for i in range(groups * every, n):
      hidden = kept(jax.tree.map(lambda x: x[i], blocks), hidden, aux)
    return hidden
  return run
