"""Every candidate kind computes what the single-device program computes.

Tolerance: fp32 plans match the single-device loss, gradients and the parameters after 3
optimizer steps within 1e-5 relative (per leaf, scaled by the leaf's largest magnitude);
bf16 plans match the loss within 2e-2 relative and the gradients within 1e-1 (bf16 keeps 8
bits of mantissa, ~4e-3 per rounding, compounded over the layers: ~3e-2 measured on the
norm scales). After 3 steps a bf16 plan's update (params after 3 steps minus the initial
ones) matches within 1e-1 too, since the SGD-momentum update is linear in the gradients
(2e-2 measured), and its fp32 master parameters within 5e-3 (9e-4 measured: 3 steps of
lr 0.05 move the weights by a few percent of their size).
The 3-step check uses SGD with momentum and weight decay (its update is linear in the
gradient). With AdamW (test_adamw_steps) the parameters match within 1e-4: Adam divides each
gradient element by its own magnitude, so a 1e-9 round-off difference on an element whose
gradient is ~3e-8 moved that parameter by ~lr/30 (measured), which is Adam's conditioning,
not the parallel program.
"""
import functools

import optax
import jax
import numpy as np
import pytest

from passes.build import build_plan, derive_program_tp
from passes.plan import Plan
from tests.models import MLP, assert_tree_close, data_reductions, llama_tiny, mlp_program

CASES = {
    "dp": Plan(dp=8),
    "fsdp": Plan(dp=8, fsdp=True),
    "tp": Plan(dp=1, tp=4),
    "dp_x_tp": Plan(dp=2, tp=4),
    "fsdp_x_tp": Plan(dp=4, tp=2, fsdp=True),
    "recompute": Plan(dp=4, recompute="full"),
    "recompute_dots": Plan(dp=2, tp=2, recompute="dots", fsdp=True),
    "recompute_selective_op": Plan(dp=2, tp=2, recompute="selective_op", fsdp=True),
    "recompute_selective_layer": Plan(dp=4, mb=2, recompute="selective_layer", fsdp=True),
    "micro_batches": Plan(dp=4, mb=4, fsdp=True),
    "bf16": Plan(dp=4, tp=2, bf16=True),
    "bf16_fsdp_low_prec": Plan(dp=8, fsdp=True, bf16=True, low_prec=True),
    "pipeline": Plan(pp=2, dp=4, mb=2),
    "pipeline_tp_fsdp_recompute": Plan(pp=2, dp=2, tp=2, mb=4, fsdp=True, recompute="full"),
    "pipeline_4_stages": Plan(pp=4, dp=2, mb=4, recompute="dots"),
    "pipeline_selective_layer": Plan(pp=2, dp=4, mb=2, recompute="selective_layer"),
    "1f1b": Plan(pp=2, dp=4, mb=4, schedule="1f1b"),
    "1f1b_tp_fsdp_recompute": Plan(pp=2, dp=2, tp=2, mb=8, fsdp=True, recompute="full", schedule="1f1b"),
    "1f1b_bf16_low_prec": Plan(pp=2, dp=4, mb=4, fsdp=True, bf16=True, low_prec=True, schedule="1f1b"),
    # HSDP: state sharded over groups of 2 data ranks, replicated across the 2 groups
    "hsdp_tp_mb_bf16": Plan(dp=4, tp=2, mb=2, fsdp=True, fsdp_group=2, bf16=True, low_prec=True),
}


def reference(program, steps=3):
  vg = jax.jit(jax.value_and_grad(program.loss))
  loss, grads = vg(program.params, program.batch)
  tx = program.optimizer

  @jax.jit
  def step(p, s, b):
    l, g = jax.value_and_grad(program.loss)(p, b)
    u, s = tx.update(g, s, p)
    return jax.tree.map(lambda a, b: a + b, p, u), s

  p, s = program.params, tx.init(program.params)
  for _ in range(steps):
    p, s = step(p, s, program.batch)
  return loss, grads, p


@pytest.fixture(scope="module")
def llama():
  prog = llama_tiny(optimizer=optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.9)))
  return prog, reference(prog), derive_program_tp(prog.abstract())


def run_plan(prog, plan, rules, steps=3):
  built = build_plan(prog, plan, jax.devices(), rules)
  params = jax.device_put(prog.params, built.param_shardings)
  batch = jax.device_put(prog.batch, built.batch_shardings)
  loss, grads = built.loss_and_grad(params, batch)
  opt = built.init_opt(params)
  p = jax.tree.map(lambda x: x.copy(), params)
  for _ in range(steps):
    p, opt, _ = built.step(p, opt, batch)
  return built, loss, grads, p


# Plans another case covers together with more (dp and tp in dp_x_tp, fsdp in fsdp_x_tp, a plain
# pipeline of either schedule in its tp/fsdp/recompute case, four stages and selective_layer's
# pipelined runner in the two-stage cases and the flat selective_layer case, 'dots' a
# jax.checkpoint policy applied as 'full' is, which the 'recompute' case covers, FSDP's gradient
# accumulation in the HSDP case's and 'recompute_selective_layer''s): `-m slow` only.
COVERED = ("dp", "fsdp", "tp", "pipeline", "1f1b", "pipeline_4_stages", "pipeline_selective_layer",
           "recompute_dots", "micro_batches")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in COVERED else n for n in CASES])
def test_llama_plan_matches_single_device(llama, name):
  prog, (ref_loss, ref_grads, ref_params), rules = llama
  plan = CASES[name]
  built, loss, grads, params = run_plan(prog, plan, rules)
  if plan.bf16:
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)
    assert_tree_close(grads, ref_grads, 1e-1, "grad ")
    delta = lambda after: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, prog.params)
    assert_tree_close(delta(params), delta(ref_params), 1e-1, "update over 3 steps ")
    assert_tree_close(params, ref_params, 5e-3, "param after 3 steps ")
    return
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_tree_close(grads, ref_grads, 1e-5, "grad ")
  assert_tree_close(params, ref_params, 1e-5, "param after 3 steps ")
  if plan.tp > 1:  # the TP rules really sharded block weights
    specs = [s.spec for s in jax.tree.leaves(built.param_shardings["blocks"])]
    assert sum("tensor" in tuple(s) for s in specs) >= 7  # q, k, v, o, gate, up, down
    edge = [tuple(s.spec) for k in ("pre", "post") for s in jax.tree.leaves(built.param_shardings[k])]
    assert sum("tensor" in s for s in edge) == 2  # the embedding and the LM head, vocab-parallel


def test_flat_mlp_tp_and_fsdp_match(llama):
  prog = mlp_program()
  ref_loss, ref_grads, ref_params = reference(prog)
  rules = derive_program_tp(prog.abstract())
  for plan in (Plan(dp=2, tp=4), Plan(dp=8, fsdp=True, mb=2), Plan(dp=4, tp=2, mb=2)):
    _, loss, grads, params = run_plan(prog, plan, rules)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_tree_close(grads, ref_grads, 1e-5, f"{plan} grad ")
    assert_tree_close(params, ref_params, 1e-5, f"{plan} param ")


@functools.lru_cache(maxsize=None)
def _adamw_program():
  prog = llama_tiny()
  return prog, reference(prog), derive_program_tp(prog.abstract())


@functools.lru_cache(maxsize=None)
def adamw_case(plan):
  """(program, reference, built, loss, grads, params after 3 steps); cached for the HLO test."""
  prog, ref, rules = _adamw_program()
  return (prog, ref) + run_plan(prog, plan, rules)


# Micro-batches with replicated weights: accumulated per data shard inside a shard_map over
# 'data', one reduction per step. CASES['hsdp_tp_mb_bf16'] and ['recompute_selective_layer'] cover FSDP's
# accumulation (CASES['micro_batches'] with -m slow).
ACCUMULATE = Plan(dp=2, tp=2, pp=1, mb=2)


@pytest.mark.parametrize("plan", [Plan(dp=8, fsdp=True), ACCUMULATE, Plan(dp=8, fsdp=True, fsdp_group=4)],
                         ids=["fsdp", "accumulate", "hsdp"])
def test_adamw_steps(plan):
  _, (ref_loss, ref_grads, ref_params), built, loss, grads, params = adamw_case(plan)
  if plan.hsdp:  # really hybrid: weights sharded over the 4-rank 'data' groups, 2 'replica's
    assert dict(built.mesh.shape) == {"stage": 1, "replica": 2, "data": 4, "tensor": 1}
    specs = [tuple(s.spec) for s in jax.tree.leaves(built.param_shardings["blocks"])]
    assert all("data" in s and "replica" not in s for s in specs)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_tree_close(grads, ref_grads, 1e-5, "grad ")
  assert_tree_close(params, ref_params, 1e-4, "param after 3 AdamW steps ")


def test_accumulated_gradient_is_reduced_over_data_once_per_step():
  """pp == 1, mb > 1, replicated weights: the gradient all-reduce over 'data' runs once per step,
  after the micro-batch loop, not inside it and the layer loop (GSPMD's placement: mb x L runs)."""
  prog, _, built, *_ = adamw_case(ACCUMULATE)
  compiled = built.lower(prog).compile()  # the step test_adamw_steps ran: cached, not compiled again
  found = data_reductions(compiled, built.mesh)
  assert found and all(count == 1 for _, count in found), found


def masked_mlp_program(batch=16):
  """An MLP whose loss is a mean over the labelled rows (mask), like an LM's over its tokens.

  Rows 8..11 carry no label, so with 4 micro-batches of a data shard some pieces weigh 0.
  """
  import jax.numpy as jnp
  from passes.program import Program
  base = mlp_program(batch=batch, optimizer=optax.sgd(0.05, momentum=0.9))
  mask = np.ones(batch, np.float32)
  mask[:3], mask[8:12] = 0.0, 0.0
  mask[5] = 3.0  # weights, not just 0/1
  mlp = MLP()

  def loss(p, b):
    err = jnp.sum((mlp.apply({"params": p}, b["x"]) - b["y"]) ** 2, axis=-1)
    return jnp.sum(err * b["m"]) / jnp.sum(b["m"])
  return Program(params=base.params, optimizer=base.optimizer, name="masked_mlp",
                 batch={**base.batch, "m": jnp.asarray(mask)}, loss_fn=loss,
                 loss_weight=lambda b: jnp.sum(b["m"]))


@pytest.mark.parametrize("plan", [Plan(dp=2, mb=4), Plan(dp=2, mb=4, fsdp=True), Plan(dp=1, mb=8)],
                         ids=["per_data_shard", "fsdp", "one_shard"])
def test_accumulation_weighs_micro_batches_by_the_loss_weight(plan):
  """Gradient accumulation of a mean over labelled rows (not over examples) is exact, pieces
  without a label included: the loss, gradients and 3 steps match the whole batch within 1e-5.
  Without the weights it would average per-piece means (wrong) and 0/0 pieces (NaN)."""
  prog = masked_mlp_program()
  loss, grads, params = reference(prog)
  assert np.isfinite(float(loss))
  _, l, g, p = run_plan(prog, plan, None)
  np.testing.assert_allclose(float(l), float(loss), rtol=1e-5)
  assert_tree_close(g, grads, 1e-5, "grads")
  assert_tree_close(p, params, 1e-5, "params after 3 steps")
