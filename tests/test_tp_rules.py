"""Tensor-parallel rules found from the dataflow (never names), checked on 8 simulated devices."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from passes.tp_rules import derive_tp_rules
from tests.models import assert_tree_close
from tests.tp_models import MLP, Attention, Block, NnxMLP, SwiGLU

X = jnp.ones((4, 8, 32))


def _init(module, x=X):
  """Parameter shapes only: the rules need no values (and flax init costs seconds here)."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]


def _random(shapes, key):
  keys = iter(jax.random.split(key, len(jax.tree.leaves(shapes))))
  return jax.tree.map(lambda s: 0.3 * jax.random.normal(next(keys), s.shape), shapes)


def _rules(module, x=X):
  params = _init(module, x)
  return derive_tp_rules(lambda p, x: jnp.mean(module.apply({"params": p}, x) ** 2), params, x)


def test_gelu_mlp_column_then_row():
  rules = _rules(MLP(hidden=64))
  assert rules.dims == {"a": {"kernel": 1, "bias": 0}, "zz": {"kernel": 0, "bias": None},
                        "n": {"w": None}}
  (g,) = rules.groups
  assert g.size == 64 and g.columns == (("a/kernel", 1),) and g.rows == (("zz/kernel", 0),)
  assert rules.specs(4)["a"]["kernel"] == P(None, "tensor")
  assert rules.specs(4)["zz"]["kernel"] == P("tensor", None)
  assert rules.specs(4)["zz"]["bias"] == P(None)
  assert rules.specs(4, prefix=("stage",))["a"]["bias"] == P("stage", "tensor")
  assert repr(rules) == "TPRules(groups=1, rejected=0, sharded=3/5 params)"


def test_nnx_mlp():
  graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxMLP(32, 64, nnx.Rngs(0))))
  def loss(pure, x):
    s = nnx.clone(state)
    nnx.replace_by_pure_dict(s, pure)
    return jnp.mean(nnx.merge(graphdef, s)(x) ** 2)
  rules = derive_tp_rules(loss, nnx.to_pure_dict(state), X)
  d = rules.dims
  assert (d["x1"]["kernel"], d["x1"]["bias"], d["x2"]["kernel"], d["x2"]["bias"]) == (1, 0, 0, None)
  assert d["s"]["scale"] is None


def test_swiglu_two_columns_meet_in_one_row():
  rules = _rules(SwiGLU(hidden=64))
  assert rules.dims == {"p": {"kernel": 1}, "b1": {"kernel": 1}, "zz": {"kernel": 0}, "k": {"w": None}}
  (g,) = rules.groups
  assert {c for c, _ in g.columns} == {"p/kernel", "b1/kernel"} and g.size == 64


def test_attention_heads_found_through_reshape_and_softmax():
  rules = _rules(Attention(heads=4, head_dim=8))
  d = rules.dims
  for name in ("zz", "a", "q7"):  # q, k, v projections and their biases
    assert d[name] == {"kernel": 1, "bias": 0}, name
  assert d["k"] == {"kernel": 0, "bias": None} and d["m"] == {"w": None}  # o projection, norm
  (g,) = rules.groups
  assert g.size == 4  # the number of heads (the gcd of H*D and H)


def test_block_under_remat_and_stacked_scan():
  """Remat and pjit sub-jaxprs are followed; scan over stacked weights shifts dims by one."""
  block = Block(heads=4, head_dim=8, hidden=64)
  p = _init(block)
  remat = jax.checkpoint(lambda p, x: block.apply({"params": p}, x))
  rules = derive_tp_rules(lambda p, x: jnp.mean(remat(p, x) ** 2), p, X)
  assert len(rules.groups) == 2 and not rules.rejected
  stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((2,) + a.shape, a.dtype), p)
  def loss(ps, x):
    return jnp.mean(jax.lax.scan(lambda h, q: (block.apply({"params": q}, h), None), x, ps)[0] ** 2)
  srules = derive_tp_rules(loss, stacked, X)
  flat = lambda r, off: [None if d is None else d + off for d in jax.tree.leaves(
      r.dims, is_leaf=lambda v: v is None)]
  assert flat(srules, 0) == flat(rules, 1)


def test_torch_style_transposed_weights():
  """`x @ W.T` with W stored [out, in], as a torch bridge produces."""
  params = {"w1": jnp.ones((64, 32)), "w2": jnp.ones((32, 64)), "c": jnp.ones((64,))}
  def loss(p, x):
    return jnp.mean((jnp.tanh(x @ p["w1"].T + p["c"]) @ p["w2"].T) ** 2)
  assert derive_tp_rules(loss, params, X).dims == {"w1": 0, "w2": 1, "c": 0}


def _entry_param_shapes(hlo: str) -> list[tuple[int, ...]]:
  entry = hlo[hlo.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  shapes = re.findall(r"= f32\[([\d,]*)\]\{[\d,]*\} parameter\(\d+\)", entry)
  return sorted(tuple(int(n) for n in s.split(",") if n) for s in shapes)


def test_sharded_block_matches_unsharded_and_weights_are_split():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
  block = Block(heads=4, head_dim=8, hidden=64)
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(1), 3)
  x, y = jax.random.normal(kx, (4, 8, 32)), jax.random.normal(ky, (4, 8, 32))
  params = _random(_init(block, x), kp)  # non-zero biases too
  def loss(p, x, y):
    return jnp.mean((block.apply({"params": p}, x) - y) ** 2)
  rules = derive_tp_rules(loss, params, x, y)
  specs = rules.specs(4)
  is_spec = lambda s: isinstance(s, P)
  sp = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec))
  batch = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
  step = jax.jit(jax.value_and_grad(loss))
  want_loss, want_grad = step(params, x, y)
  compiled = step.lower(sp, xs, ys).compile()
  got_loss, got_grad = compiled(sp, xs, ys)
  assert abs(float(got_loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
  # The key bias ('a') has a zero gradient in exact arithmetic (softmax is shift-invariant):
  # both sides are rounding noise, so it is compared absolutely.
  kb_got, kb_want = got_grad["u"]["a"].pop("bias"), want_grad["u"]["a"].pop("bias")
  assert float(jnp.max(jnp.abs(kb_want))) < 1e-7 and float(jnp.max(jnp.abs(kb_got))) < 1e-7
  assert_tree_close(got_grad, want_grad, 1e-5, "grad ")
  # The compiled program holds only each device's slice: tensor-sharded dims divided by 4.
  hlo = compiled.as_text()
  local = lambda a, s: tuple(n // (4 if ax == "tensor" else 1) for n, ax in
                             zip(a.shape, tuple(s) + (None,) * a.ndim))
  want = [local(a, s) for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=is_spec))]
  assert _entry_param_shapes(hlo) == sorted(want + [(2, 8, 32)] * 2)
  assert (32, 8) in want and (8, 32) in want  # q/k/v kernels by columns, o kernel by rows


def test_heads_not_divisible_by_tp_are_replicated():
  rules = derive_tp_rules(*_block_loss(Block(heads=6, head_dim=4, hidden=64)))
  att, mlp = sorted(rules.groups, key=lambda g: g.size)
  assert (att.size, mlp.size) == (6, 64)
  specs = rules.specs(4)
  assert all(s == P(None, None) or s == P(None) for s in jax.tree.leaves(
      specs["u"], is_leaf=lambda s: isinstance(s, P)))  # the whole attention group replicated
  assert specs["v"]["a"]["kernel"] == P(None, "tensor")  # the MLP still shards
  (why,) = rules.unshardable(4)
  assert "6 units" in why and "tp=4" in why
  assert rules.shardable(4) and rules.shardable(2) and not rules.shardable(5)
  assert rules.specs(3)["u"]["zz"]["kernel"] == P(None, "tensor") and len(rules.unshardable(3)) == 1
  with pytest.raises(ValueError, match="positive int"):
    rules.specs(0)


def _block_loss(block):
  params = _init(block)
  return (lambda p, x: jnp.mean(block.apply({"params": p}, x) ** 2)), params, X


@pytest.mark.parametrize("body, reason", [
    (lambda h, p: h * jnp.sum(h, -1, keepdims=True) @ p["w2"], "reduce_sum"),  # summed over first
    (lambda h, p: h @ jnp.ones((64, 32)), "non-parameter"),  # contracted with an activation
    (lambda h, p: jnp.take(h, jnp.array([0, 3]), axis=-1) @ p["w2"][:2], "gather"),
    (lambda h, p: h, "function output"),
])
def test_communication_on_the_tracked_dim_is_rejected(body, reason):
  params = {"w1": jnp.ones((32, 64)), "w2": jnp.ones((64, 32))}
  rules = derive_tp_rules(lambda p, x: body(jax.nn.relu(x @ p["w1"]), p), params, jnp.ones((4, 32)))
  assert not rules.groups and rules.dims == {"w1": None, "w2": None} and not rules.shardable(1)
  assert any(reason in g.reason for g in rules.rejected), rules.rejected
  assert rules.rejected[0].columns == (("w1", 1),)


def test_parameter_used_outside_its_group_is_rejected():
  params = {"w1": jnp.ones((32, 64)), "w2": jnp.ones((64, 32))}
  def loss(p, x):
    return jnp.sum(jax.nn.relu(x @ p["w1"]) @ p["w2"]) + jnp.sum(p["w1"] ** 2)
  rules = derive_tp_rules(loss, params, jnp.ones((4, 32)))
  assert not rules.groups and "w1 is also used by `integer_pow`" in rules.rejected[0].reason


def test_bad_arguments():
  with pytest.raises(TypeError, match="callable"):
    derive_tp_rules("loss", {}, X)
  rules = _rules(MLP())
  with pytest.raises(TypeError, match="prefix"):
    rules.specs(2, prefix="stage")


def test_edge_tp_dim_shards_the_largest_dim_when_it_divides():
  from passes.evaluate import edge_tp_dim
  assert edge_tp_dim((4096, 128), 8) == 0  # token embedding [vocab, dim]: vocabulary-parallel
  assert edge_tp_dim((128, 4096), 8) == 1  # LM head kernel [dim, vocab]
  assert edge_tp_dim((64, 64), 4) == 0  # the first of equals
  assert edge_tp_dim((50257, 768), 2) is None  # GPT-2's vocabulary does not divide: replicated
  assert edge_tp_dim((128,), 2) is None  # norms and biases stay replicated
