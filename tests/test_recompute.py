"""Recomputation policies (passes.recompute): what each saves, in the traced program and in XLA.

Their numerical equivalence with 'none' (loss, gradients, 3 optimizer steps within 1e-5
relative in fp32) is tested with the other plans in tests/test_step_equivalence.py.
"""
import jax
import jax.numpy as jnp
import pytest

from ap_xla.models.llama import LlamaConfig
from passes import recompute as rc
from passes.build import derive_program_tp
from passes.evaluate import compile_plan
from passes.hardware import get_profile
from passes.plan import Plan
from passes.program import BLOCKS
from passes.screen import build_screen
from tests.models import llama_tiny

# Wide enough that the blocks' residuals dominate XLA's temporaries (not the head or the weights).
CFG = LlamaConfig(vocab=64, dim=64, layers=4, heads=4, ffn=192, seq=64)


def _block_args(prog):
  block0 = jax.tree.map(lambda x: x[0], prog.params[BLOCKS])
  h, aux = prog.layers.pre(prog.params["pre"], prog.batch)
  return block0, h, aux


def test_selective_op_names_every_other_matmul_as_torchtitan_counts():
  # torchtitan counts mm calls per block in forward order and recomputes the even ones: of a
  # Llama block's q, k, v, o, gate, up, down it keeps q, v, gate (w1) and down (w2).
  prog = llama_tiny(batch=2)
  named = rc._name_every_other_matmul(prog.layers.block)
  jaxpr = jax.make_jaxpr(named)(*_block_args(prog)).jaxpr
  eqns = list(jaxpr.eqns)
  dots = [i for i, e in enumerate(eqns) if rc._is_matmul(e)]
  assert len(dots) == 7
  tagged = [i for i in dots if any(e.primitive.name == "name" and e.params["name"] == rc.SAC_SAVED
                                   and e.invars[0] is eqns[i].outvars[0] for e in eqns)]
  assert tagged == [dots[0], dots[2], dots[4], dots[6]]
  # the fused attention's output carries its own name ('selective_op' keeps it too)
  assert any(e.primitive.name == "name" and e.params["name"] == rc.ATTENTION_OUT for e in eqns)


def test_selective_layer_is_a_stack_policy():
  with pytest.raises(ValueError, match="selective_layer"):
    rc.checkpointed(lambda p, h, a: h, "selective_layer")
  with pytest.raises(ValueError, match="not a per-block policy"):
    rc.checkpointed(lambda p, h, a: h, "sometimes")


def test_runner_recomputes_every_second_block_and_runs_leftovers_plainly():
  calls = []

  def block(p, h, aux):
    calls.append(p.shape)
    return h * p.sum() + aux
  run = rc.layer_runner(block, "selective_layer")
  blocks = jnp.arange(1.0, 6.0).reshape(5, 1)  # 5 blocks: two groups of 2, one left over
  out = run(blocks, jnp.ones(3), 0.5)
  ref = jnp.ones(3)
  for i in range(5):
    ref = ref * blocks[i].sum() + 0.5
  assert jnp.allclose(out, ref)
  closed = jax.make_jaxpr(jax.grad(lambda b: run(b, jnp.ones(3), 0.5).sum()))(blocks)
  assert "checkpoint" in str(closed) or "remat" in str(closed)


def test_runner_keeps_no_copy_of_the_weights(capsys):
  """What a group of blocks keeps of its weights is the stacked weights themselves (their
  reshape into groups), never a stack the scan builds: a block that took its slice of the
  group saved that slice, a copy of the weights that FSDP even laid out gathered."""
  from jax.ad_checkpoint import print_saved_residuals

  def block(w, h, aux):
    return jnp.tanh(h @ w)
  run = rc.layer_runner(block, "selective_layer")
  print_saved_residuals(lambda b, h: run(b, h, None).sum(), jnp.ones((4, 8, 8)), jnp.ones((3, 8)))
  saved = capsys.readouterr().out.splitlines()
  weights = [line for line in saved if line.split()[0].endswith(",8,8]")]
  assert weights and all("output of scan" not in line for line in weights), saved


@pytest.mark.slow  # five compiles
def test_saved_activations_order_the_policies_as_xla_memory_does():
  """The screen's residuals per policy (its `saved_activations` term) come in the order of
  XLA:CPU's compiled temporaries for the same plans (layers under scan, where XLA's memory
  analysis shows remat savings: FIELD_NOTES)."""
  from ap_xla.models.llama import llama_program
  prog = llama_program(CFG, 4).abstract()
  dev = jax.devices()[:1]
  rules = derive_program_tp(prog)
  plans = [Plan(recompute=r) for r in rc.POLICIES]
  screen = build_screen(prog, dev, rules, plans)
  saved, temp = {}, {}
  for p in plans:
    saved[p.recompute] = screen(p, get_profile("cpu")).memory["saved_activations"]
    temp[p.recompute] = compile_plan(prog, p, dev, None).memory_analysis().temp_size_in_bytes
  print("screen saved_activations:", saved, "XLA temporaries:", temp)
  # 'selective_layer' is left out of the order: the screen's mean of 'none' and 'full' puts it
  # below 'dots', but XLA:CPU's temporaries for it are above even 'none's here (7.93 vs 7.62 MB,
  # measured 2026-12-06 after the runner stopped copying the weights: 8.78 before). XLA:GPU
  # orders it between them (test_gpu_target); on XLA:CPU the rest is untraced (README known
  # limits), which is why the auto space does not search it.
  per_block = [r for r in saved if r != "selective_layer"]
  by_screen = sorted(per_block, key=saved.get)
  by_xla = sorted(per_block, key=temp.get)
  assert by_screen == by_xla, (saved, temp)
  assert by_screen[0] == "full" and by_screen[-1] == "none"


@pytest.mark.slow  # bridges a transformers model
def test_bridged_hf_llama_selective_policies_match_none():
  """On a bridged transformers Llama (sdpa attention, padded batch) 'selective_op' finds its 4
  kept projections and the fused attention's output, and every policy gives the loss and
  gradients of 'none' (fp32, within 1e-5 relative per leaf; 4e-7 measured)."""
  import optax
  from bridge import testing
  from bridge.program import bridge_model
  from tests.models import assert_tree_close
  model = testing.tiny_causal_lm("llama", attn="sdpa", layers=2, hidden=32, heads=4)
  prog = bridge_model(model, testing.lm_batch(2, 32, pad=True), optax.sgd(0.1)).program
  block0, h, aux = _block_args(prog)
  eqns = jax.make_jaxpr(rc._name_every_other_matmul(prog.layers.block))(block0, h, aux).jaxpr.eqns
  names = [e.params["name"] for e in eqns if e.primitive.name == "name"]
  assert sorted(names) == sorted([rc.SAC_SAVED] * 4 + [rc.ATTENTION_OUT])

  def loss(params, policy):
    hh, a = prog.layers.pre(params["pre"], prog.batch)
    hh = rc.layer_runner(prog.layers.block, policy)(params[BLOCKS], hh, a)
    return prog.layers.post(params["post"], hh, a, prog.batch)
  vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grads = vg(prog.params, "none")
  for policy in ("selective_op", "selective_layer"):
    l, g = vg(prog.params, policy)
    assert abs(float(l) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert_tree_close(g, ref_grads, 1e-5, f"{policy} grad ")
