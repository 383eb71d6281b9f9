"""The screen's 'scratch' term: XLA:CPU's Eigen packing memory for the dots it runs outside
YNNPACK (`passes.screen_scratch`), against the compiled side's `memory.cpu_dot_scratch`."""
import jax
import jax.numpy as jnp
import pytest

from ap_xla.models.llama import LlamaConfig, llama_program
from passes import build, jaxpr_cost, memory, screen
from passes.evaluate import compile_plan
from passes.hardware import get_profile
from passes.plan import Plan

CFG = LlamaConfig(vocab=512, dim=64, layers=2, heads=4, ffn=128, seq=32)


def test_a_weight_gradient_is_an_eigen_dot_and_a_forward_matmul_is_not():
  """JAX's weight gradient is `transpose(dot_general(dy, x))`: XLA folds it into `dot(x, dy)`,
  x contracted on its leading dims, which YNNPACK does not take. Per device under TP."""
  x = jax.ShapeDtypeStruct((4, 32, 64), jnp.float32)
  w = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  grad_w = jax.make_jaxpr(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w)), argnums=0))(w, x)
  c = jaxpr_cost.analyze(grad_w, [None, None], fusion="xla:cpu")
  assert c.eigen_dots == ((64, 128, 128, 4),)  # m = x's free dim, n = dy's, k = 4 x 32 tokens
  assert c.eigen_scratch == memory.eigen_packing_bytes(64, 128, 128, 4) == 2 * 128 * (64 + 128) * 4
  sharded = jaxpr_cost.analyze(grad_w, [1, None], tp=4, fusion="xla:cpu")  # w's columns over 'tensor'
  assert sharded.eigen_dots == ((64, 32, 128, 4),)
  assert jaxpr_cost.analyze(grad_w, [None, None], fusion="xla").eigen_dots == ()  # XLA:CPU's alone
  fwd = jax.make_jaxpr(lambda w, x: jnp.tanh(x @ w))(w, x)
  assert jaxpr_cost.analyze(fwd, [None, None], fusion="xla:cpu").eigen_dots == ()


@pytest.mark.parametrize("plan, eigen", [
    (Plan(dp=2, tp=4, mb=2), True),  # accumulated with replicated weights: 'data' psum after the loop
    (Plan(dp=2, tp=4, mb=1), False),  # GSPMD all-reduces each gradient at its dot: nothing folds
], ids=["accumulated", "reduced-at-dot"])
def test_the_screens_scratch_is_the_compiled_dot_scratch(plan, eigen):
  prog = llama_program(CFG, 8, abstract=True)
  rules = build.derive_program_tp(prog)
  s = screen.build_screen(prog, jax.devices(), rules, [plan])(plan, get_profile("cpu"))
  compiled = compile_plan(prog, plan, jax.devices(), build.tp_dims(prog, rules, plan.tp))
  expected = memory.memory_stats(compiled, "cpu").scratch
  assert (expected > 0) == eigen, expected
  assert s.memory["scratch"] == expected
