"""The screen's 'scratch' term: XLA:CPU's Eigen packing memory for the dots it runs outside
YNNPACK (`passes.screen_scratch`): which dots a part's jaxpr runs so. Against the compiled
side's `memory.cpu_dot_scratch` per plan: tests/test_screen_memory.py."""
import jax
import jax.numpy as jnp

from passes import jaxpr_cost, memory


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
