"""The analytic screen: its exact terms against XLA's analysis, its jaxpr reading on known functions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from passes import build, hlo_stats, jaxpr_cost, memory, screen
from passes.evaluate import compile_plan
from passes.hardware import get_profile
from passes.plan import Plan
from tests.models import llama_tiny

PLANS = [Plan(dp=8), Plan(dp=4, tp=2, fsdp=True, mb=2, recompute="full"),
         Plan(dp=2, tp=2, pp=2, mb=2, fsdp=True, bf16=True, low_prec=True),
         Plan(dp=4, tp=2, fsdp=True, fsdp_group=2, recompute="dots", bf16=True, low_prec=True)]  # HSDP


@pytest.fixture(scope="module")
def compiled():
  prog = llama_tiny(batch=16).abstract()
  rules = build.derive_program_tp(prog)
  s = screen.build_screen(prog, jax.devices(), rules, PLANS)
  out = []
  for p in PLANS:
    c = compile_plan(prog, p, jax.devices(), build.tp_dims(prog, rules, p.tp))
    out.append((p, s(p, get_profile("cpu")), c))
  return out


def test_the_training_state_is_exact(compiled):
  """Parameters, optimizer state and batch under each plan's shardings: XLA's argument + output -
  alias (what a plan holds whatever its temporaries), to the byte."""
  for p, s, c in compiled:
    m = memory.memory_stats(c)
    assert s.persistent_bytes == m.argument + m.output - m.alias, p
    assert s.memory["params"] > 0 and s.memory["opt_state"] == 2 * s.memory["params"] + 4  # AdamW: mu, nu, count


def test_flops_come_from_the_jaxpr_exactly(compiled):
  for p, s, c in compiled:
    stats = hlo_stats.analyze_hlo(c.as_text())
    assert s.flops == pytest.approx(stats.flops, rel=1e-6), p


def test_estimates_are_close_to_the_compiled_ones(compiled):
  """Not a goal in itself (the calibration corrects), a guard against a broken term."""
  from passes import cost_model
  for p, s, c in compiled:
    stats = hlo_stats.analyze_hlo(c.as_text())
    est = cost_model.estimate_step_time(stats, p, get_profile("cpu")).total_s
    assert 0.6 < s.est_time_s / est < 1.5, (p, s.est_time_s, est)
    total = memory.memory_stats(c, "cpu", stats).total
    assert 0.6 < s.memory_bytes / total < 1.6, (p, s.memory, total)


def test_megatron_mlp_costs_per_device():
  """A column-then-row MLP over 'tensor': FLOPs split tp ways, one all-reduce of the output."""
  def mlp(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2
  x, w1, w2 = jnp.ones((8, 64)), jnp.ones((64, 256)), jnp.ones((256, 64))
  closed = jax.make_jaxpr(mlp)(x, w1, w2)
  one = jaxpr_cost.analyze(closed, [None, None, None], tp=1)
  four = jaxpr_cost.analyze(closed, [None, 1, 0], tp=4)
  assert one.flops == 2 * 8 * 64 * 256 * 2 and four.flops == one.flops / 4
  assert one.comms == () and four.comms == (jaxpr_cost.Comm("all-reduce", 8 * 64 * 4, 1),)
  assert four.out_dims == (None,)  # reduced: replicated
  # the hidden activation is sharded: a quarter of its bytes per device
  assert four.largest[0] == 8 * 256 * 4 // 4


def test_partial_sums_are_reduced_once():
  """Two row-parallel matmuls added before use: one all-reduce, as XLA reassociates them."""
  def f(x, y, w1, w2):
    return jnp.exp(x @ w1 + y @ w2)
  a, w = jnp.ones((8, 32)), jnp.ones((32, 16))
  c = jaxpr_cost.analyze(jax.make_jaxpr(f)(a, a, w, w), [1, 1, 0, 0], tp=2)
  assert c.comms == (jaxpr_cost.Comm("all-reduce", 8 * 16 * 4, 1),)


def test_independent_collectives_combine_and_dependent_ones_do_not():
  """As XLA's all-reduce combiner does: three row-parallel matmuls that do not depend on each
  other (a block backward's q, k and v input gradients) are reduced by one all-reduce of their
  summed bytes; a second row-parallel matmul fed by the first's reduced sum gets one of its own.
  Checked against XLA: the same function compiled with its inputs sharded over 4 devices has
  as many all-reduces as the screen charges (more than one device needed for that part)."""
  def f(q, k, v, wq, wk, wv, w2):
    a = jnp.tanh(q @ wq), jnp.tanh(k @ wk), jnp.tanh(v @ wv)  # level 1: one all-reduce
    return (a[0] + a[1] + a[2]) @ w2  # w2 column-sharded: the sum is replicated; no second one
  def g(q, wq, w2, w3):
    h = jnp.tanh(q @ wq)  # reduced (level 1)
    return jnp.tanh((h @ w2)) @ w3  # column- then row-parallel: reduced again (level 2)
  x, w = jnp.ones((8, 32)), jnp.ones((32, 32))
  c = jaxpr_cost.analyze(jax.make_jaxpr(f)(x, x, x, w, w, w, w), [1, 1, 1, 0, 0, 0, 1], tp=4)
  assert c.comms == (jaxpr_cost.Comm("all-reduce", 3 * 8 * 32 * 4, 1),)
  c = jaxpr_cost.analyze(jax.make_jaxpr(g)(x, w, w, w), [1, 0, 1, 0], tp=4)
  assert c.comms == (jaxpr_cost.Comm("all-reduce", 8 * 32 * 4, 1), jaxpr_cost.Comm("all-reduce", 8 * 32 * 4, 1))
  if len(jax.devices()) >= 4:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:4]), ("tensor",))
    spec = lambda d: NamedSharding(mesh, P(*([None] * d + ["tensor"])))
    for fn, dims, n in ((f, [1, 1, 1, 0, 0, 0, 1], 1), (g, [1, 0, 1, 0], 2)):
      args = [jax.ShapeDtypeStruct((8, 32) if i < (3 if fn is f else 1) else (32, 32), jnp.float32,
                                   sharding=spec(d)) for i, d in enumerate(dims)]
      text = jax.jit(fn).lower(*args).compile().as_text()
      assert sum(c.count for c in hlo_stats.analyze_hlo(text).collectives if c.kind == "all-reduce") == n


def test_loops_are_unrolled_and_residuals_classified():
  """A scan body counts length times; what a vjp keeps is told apart by what it depends on."""
  def body(h, w):
    return jnp.tanh(h @ w), None
  def f(h, ws):
    return jax.lax.scan(body, h, ws)[0]
  h, ws = jnp.ones((4, 16)), jnp.ones((3, 16, 16))
  c = jaxpr_cost.analyze(jax.make_jaxpr(f)(h, ws), [None, None])
  assert c.flops == 3 * 2 * 4 * 16 * 16
  fwd = jax.make_jaxpr(lambda h, w: jax.vjp(lambda h: jnp.tanh(h @ w), h))(h, ws[0])
  c = jaxpr_cost.analyze(fwd, [None, None], groups=[0, 1])
  # outputs: the primal, then the residuals (tanh's output depends on both inputs; w itself)
  assert c.out_deps[0] == 0b11 and 1 in c.out_sources[1:]


def test_eager_fusion_runs_each_elementwise_op_as_its_own_kernel():
  """'xla' fuses exp -> mul -> add into one kernel (read x, write y); 'eager' (PyTorch without
  torch.compile) runs three, each reading its operand and writing its result, and keeps the
  intermediates in memory."""
  x = jnp.ones((1024,), jnp.float32)
  closed = jax.make_jaxpr(lambda x: jnp.exp(x) * 2.0 + 1.0)(x)
  fused = jaxpr_cost.analyze(closed, [None])
  eager = jaxpr_cost.analyze(closed, [None], fusion="eager")
  assert fused.kernel_bytes == 2 * 4096 and len(fused.kernels) == 1
  assert eager.kernel_bytes == 6 * 4096 and len(eager.kernels) == 3
  assert eager.peak_bytes > fused.peak_bytes
  with pytest.raises(ValueError, match="fusion='inductor'"):
    jaxpr_cost.analyze(closed, [None], fusion="inductor")
