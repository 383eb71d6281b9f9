"""Frozen parameters (`Program.trainable`): no gradient, no optimizer state, unchanged by the step.

Every plan kind (DP, FSDP, TP, accumulation, GPipe, 1F1B) trains the trainable leaves as the
single-device program differentiated with respect to them alone does: loss and gradients
within 1e-5 relative (per leaf, scaled by its magnitude), parameters after 3 AdamW steps
within 1e-4 (Adam divides by each element's own gradient magnitude, which amplifies
round-off on tiny gradients: tests/test_step_equivalence.py), and the frozen leaves come
back bit-identical. The plan's
memory, XLA's analysis and the analytic screen, drops their optimizer state and gradients.
"""
import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest

from passes import build, memory, screen
from passes.evaluate import compile_plan
from passes.hardware import get_profile
from passes.plan import Plan
from passes.program import Program, combine, partition
from tests.models import TINY_LLAMA, assert_tree_close, llama_tiny

# embeddings, two block weights and the final norm frozen
TRAINABLE = {"pre": False, "post": {"lm_head": {"kernel": True}, "norm": {"scale": False}},
             "blocks": {"attn_norm": True, "down": True, "gate": False, "k": False, "mlp_norm": True,
                        "o": True, "q": True, "up": True, "v": True}}

CASES = {  # one per code path of passes.step: plain, accumulation per data shard, FSDP accumulation, GPipe, 1F1B
    "fsdp_x_tp": Plan(dp=4, tp=2, fsdp=True),
    "accumulate": Plan(dp=4, mb=2),
    "accumulate_fsdp": Plan(dp=8, mb=2, fsdp=True),
    "pipeline": Plan(pp=2, dp=4, mb=2),
    "1f1b_tp_fsdp": Plan(pp=2, dp=2, tp=2, mb=4, fsdp=True, schedule="1f1b"),
}


@functools.lru_cache(maxsize=None)
def frozen_program() -> Program:
  prog = llama_tiny(optimizer=optax.adamw(1e-3, weight_decay=0.1), cfg=dataclasses.replace(TINY_LLAMA, layers=2))
  return dataclasses.replace(prog, trainable=TRAINABLE)


def dataclasses_replace(prog, **kw):
  return dataclasses.replace(prog, **kw)


@functools.lru_cache(maxsize=None)
def reference(steps=3):
  prog = frozen_program()
  tx = prog.optimizer

  def loss(t, f, b):
    return prog.loss(combine(t, f), b)

  vg = jax.jit(jax.value_and_grad(loss))
  t, f = prog.split(prog.params)
  l0, g0 = vg(t, f, prog.batch)
  s = tx.init(t)
  for _ in range(steps):
    _, g = vg(t, f, prog.batch)
    u, s = tx.update(g, s, t)
    t = optax.apply_updates(t, u)
  return l0, g0, combine(t, f)


def test_trainable_is_normalized_and_checked():
  prog = frozen_program()
  assert prog.has_frozen and prog.num_trainable_params < prog.num_params
  assert jax.tree.structure(prog.trainable) == jax.tree.structure(prog.params)
  t, f = prog.split(prog.params)
  assert t["pre"]["tok"]["embedding"] is None and f["pre"]["tok"]["embedding"] is not None
  assert jax.tree.leaves(combine(t, f)) == jax.tree.leaves(prog.params)
  assert dataclasses_replace(prog, trainable={"pre": True, "blocks": True, "post": True}).trainable is None
  with pytest.raises(ValueError, match="nothing to train"):
    dataclasses_replace(prog, trainable=False)
  with pytest.raises(ValueError, match="True .trained. or False"):
    dataclasses_replace(prog, trainable={"pre": 1, "blocks": True, "post": True})
  with pytest.raises(ValueError, match="structure of params"):
    dataclasses_replace(prog, trainable={"pre": True})
  assert partition({"a": 1, "b": 2}, {"a": True, "b": False}) == ({"a": 1, "b": None}, {"a": None, "b": 2})


@pytest.mark.parametrize("name", list(CASES))
def test_plan_trains_only_the_trainable_leaves(name):
  prog, plan = frozen_program(), CASES[name]
  l0, g0, p_ref = reference()
  built = build.build_plan(prog, plan, jax.devices(), build.derive_program_tp(prog.abstract()))
  params = jax.device_put(prog.params, built.param_shardings)
  batch = jax.device_put(prog.batch, built.batch_shardings)
  loss, grads = built.loss_and_grad(params, batch)
  np.testing.assert_allclose(loss, l0, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(g0)  # None at the frozen leaves
  assert_tree_close(grads, g0, 1e-5, f"{name} grads ")
  opt = built.init_opt(params)
  assert jax.tree.structure(opt) == jax.tree.structure(prog.optimizer.init(prog.split(prog.params)[0]))
  p = jax.tree.map(lambda x: x.copy(), params)  # the step donates its inputs
  for _ in range(3):
    p, opt, _ = built.step(p, opt, batch)
  assert_tree_close(p, p_ref, 1e-4, f"{name} params ")
  for a, e in zip(jax.tree.leaves(prog.split(p)[1]), jax.tree.leaves(prog.split(prog.params)[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))  # frozen: bit-identical


def test_memory_excludes_frozen_gradients_and_optimizer_state():
  """XLA's analysis and the screen agree: the training state drops AdamW's mu and nu of the
  frozen leaves (to the byte), and the screen's gradient term drops their gradients as its
  peak holds them (this plan peaks in the layer loop's backward: pre's and post's whole over
  'data' before their reduction, the blocks' stacked as stored)."""
  frozen = frozen_program().abstract()
  full = dataclasses_replace(frozen, trainable=None)
  plans = [Plan(dp=4, tp=2, fsdp=True)]  # plain DP with FSDP: tests/test_torch_finetune.py
  rules = build.derive_program_tp(full)
  out = {}
  for label, prog in (("frozen", frozen), ("full", full)):
    s = screen.build_screen(prog, jax.devices(), rules, plans)
    for plan in plans:
      c = compile_plan(prog, plan, jax.devices(), build.tp_dims(prog, rules, plan.tp))
      held = (s.trainable_bytes(plan, "pre", gathered=True) + s.trainable_bytes(plan, "post", gathered=True)
              + s.trainable_bytes(plan, "blocks"))
      out[label, plan] = (s(plan, get_profile("cpu")), memory.memory_stats(c), s.trainable_bytes(plan), held)
  for plan in plans:
    (sf, mf, tf, hf), (sa, ma, ta, ha) = out["frozen", plan], out["full", plan]
    frozen_bytes = ta - tf
    assert frozen_bytes > 0
    for s, m in ((sf, mf), (sa, ma)):  # the screen's state is XLA's, exactly
      assert s.persistent_bytes == m.argument + m.output - m.alias, plan
    assert sf.memory["params"] == sa.memory["params"]  # held (and sharded) like any parameter
    assert sa.memory["opt_state"] - sf.memory["opt_state"] == 2 * frozen_bytes  # no mu, nu
    assert sf.temporaries_detail == sa.temporaries_detail  # the same phase: the layer loop's backward
    assert sa.memory["grads"] - sf.memory["grads"] == ha - hf > 0  # no gradients
    # no gradient reduction nor optimizer update for the frozen leaves: a shorter screened step
    assert sf.est_time_s < sa.est_time_s, plan
    # XLA's whole footprint shrinks by at least the optimizer state and gradients dropped
    assert ma.total - mf.total >= 2 * frozen_bytes, (plan, ma, mf, frozen_bytes)
