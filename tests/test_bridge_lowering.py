"""Lowering of ATen graphs: the bridge's own lowerings and the unsupported-operator error."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from bridge import lowering
from bridge.lowering import UnsupportedOperatorError
from bridge.program import bridge_model
from tests.torch_models import Pooler

# torchax asks JAX for int64 constants; without x64 they are int32, as intended.
pytestmark = pytest.mark.filterwarnings("ignore:Explicitly requested dtype int64:UserWarning")


def test_softmax_matches_torch_and_has_finite_gradients_on_fully_masked_rows():
  x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  x[1] = -np.inf  # a fully masked row
  x[2, :2] = -np.inf
  expect = torch.softmax(torch.from_numpy(x), -1).numpy()
  got = np.asarray(lowering._softmax(jnp.asarray(x), -1))
  np.testing.assert_allclose(got, expect, atol=1e-7)  # NaN in row 1, like torch
  assert np.isnan(got[1]).all()

  def masked_sum(x):  # what export's sdpa decomposition does with masked rows
    y = lowering._softmax(x, -1)
    dead = jnp.all(x == -jnp.inf, axis=-1, keepdims=True)
    return jnp.sum(jnp.where(dead, 0.0, y) * jnp.arange(5.0))

  g = jax.grad(masked_sum)(jnp.asarray(x))
  assert np.isfinite(np.asarray(g)).all()
  ref = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, -1) * jnp.arange(5.0)))(jnp.asarray(x[[0]]))
  np.testing.assert_allclose(np.asarray(g[0]), np.asarray(ref[0]), atol=1e-7)


def test_to_copy_without_dtype_keeps_the_array():
  x = jnp.arange(4, dtype=jnp.float32)
  assert lowering._to_copy(x, device=torch.device("cpu")) is x
  assert lowering._to_copy(x, dtype=torch.bfloat16).dtype == jnp.bfloat16


def test_grouped_mm_matches_transformers_fallback():
  """transformers' mixture-of-experts matmul (Mixtral, Qwen-MoE) lowers to jax.lax.ragged_dot."""
  from transformers.integrations import moe  # registers torch.ops.transformers.grouped_mm_fallback
  op = torch.ops.transformers.grouped_mm_fallback.default
  g = torch.Generator().manual_seed(0)
  x, w = torch.randn(10, 4, generator=g), torch.randn(3, 4, 5, generator=g)
  offs = torch.tensor([3, 3, 8])  # expert 1 gets no rows; rows 8-9 belong to no expert (zeros)
  want = op(x, w, offs).numpy()
  fn = lowering.lowering_for(op)
  got = fn(jnp.asarray(x.numpy()), jnp.asarray(w.numpy()), jnp.asarray(offs.numpy()))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  assert not np.asarray(got)[8:].any()


@pytest.mark.parametrize("shape,dim,index_shape", [
    ((4, 6, 10), -1, (4, 6, 1)),  # a loss's label pick
    ((4, 6, 10), 1, (4, 3, 10)),  # several per row, along a middle axis
    ((5, 7), 0, (2, 7)),
    ((4, 6, 10), 2, (4, 2, 3)),  # smaller than the input on another axis: torchax's lowering
])
def test_gather_matches_torch_values_and_gradients(shape, dim, index_shape):
  """Tolerance: f32, 1e-6 absolute (the same values picked; the gradient a scatter-add)."""
  g = torch.Generator().manual_seed(0)
  x = torch.randn(*shape, generator=g, requires_grad=True)
  index = torch.randint(0, shape[dim], index_shape, generator=g)
  w = torch.randn(*index_shape, generator=g)
  (torch.gather(x, dim, index) * w).sum().backward()
  fn = lowering.lowering_for(torch.ops.aten.gather.default)
  xj, ij, wj = (jnp.asarray(t.detach().numpy()) for t in (x, index, w))
  np.testing.assert_allclose(np.asarray(fn(xj, dim, ij)), torch.gather(x, dim, index).detach().numpy(), atol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(fn(v, dim, ij) * wj))(xj)
  np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), atol=1e-6)


def test_gather_of_a_batch_sharded_loss_needs_no_all_gather():
  """Under data parallelism a loss's label pick stays on each device's rows, in the gradient too:
  torchax's own lowering (full index arrays) makes GSPMD all-gather its scatter-add's operands."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices")
  mesh = Mesh(np.array(devices), ("data",))
  shard = NamedSharding(mesh, P("data"))
  n = len(devices)
  ours = lowering.lowering_for(torch.ops.aten.gather.default)
  theirs = lowering.torchax_compat.aten_lowerings()[torch.ops.aten.gather].func

  def all_gathers(gather):
    def loss(logits, labels):
      return -gather(jax.nn.log_softmax(logits), -1, labels[..., None]).mean()
    f = jax.jit(jax.grad(loss), in_shardings=(shard, shard))
    args = jax.ShapeDtypeStruct((2 * n, 16, 64), jnp.float32), jax.ShapeDtypeStruct((2 * n, 16), jnp.int32)
    return f.lower(*args).compile().as_text().count(" all-gather(")

  assert all_gathers(ours) == 0
  assert all_gathers(theirs) > 0  # what the lowering is for (if torchax's stops needing it, drop ours)


class Encoder(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Linear(4, 4)
    self.pool = Pooler()

  def forward(self, x):
    return self.pool(self.proj(x))


class Model(torch.nn.Module):

  def __init__(self, dropout=0.0):
    super().__init__()
    self.encoder = Encoder()
    self.p = dropout

  def forward(self, x):
    if self.p:
      return F.dropout(self.encoder.proj(x), self.p, self.training).sum()
    return self.encoder(x).sum()


def test_unsupported_operator_error_names_op_module_and_source_line():
  with pytest.raises(UnsupportedOperatorError) as info:
    bridge_model(Model(), {"x": torch.randn(2, 3, 4)}, optax.sgd(0.1))
  msg = str(info.value)
  assert "aten::segment_reduce" in msg
  assert "module 'encoder.pool'" in msg
  assert "torch_models.py" in msg and "torch.segment_reduce(" in msg
  assert "EXTRA_LOWERINGS" in msg  # says what to do


def test_random_ops_are_rejected_with_a_hint():
  with pytest.raises(UnsupportedOperatorError, match="random.*dropout"):
    bridge_model(Model(dropout=0.5).train(), {"x": torch.randn(2, 3, 4)}, optax.sgd(0.1))
  # In eval mode dropout is the identity and bridges.
  bridged = bridge_model(Model(dropout=0.5).eval(), {"x": torch.randn(2, 3, 4)}, optax.sgd(0.1))
  assert bridged.program.layers is None


class Flatten(torch.nn.Module):

  def forward(self, x):
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2]).sum()


def test_symbolic_sizes_come_from_the_arrays_at_hand():
  from bridge.capture import capture
  captured = capture(Flatten(), {"x": torch.randn(3, 4, 2)})
  assert captured.dynamic_batch
  sizes = [n for n in captured.graph.nodes if lowering.is_symbolic(n)]
  bindings = lowering.bind_symbols([(captured.inputs["x"].meta["val"], jnp.zeros((7, 4, 2)))])
  assert len(bindings) == 1
  assert sorted(lowering.symbolic_value(n, bindings) for n in sizes) == [7, 28]
  with pytest.raises(ValueError, match="no input carries"):
    lowering.symbolic_value(sizes[0], {})


class Attention(torch.nn.Module):

  def __init__(self, dropout):
    super().__init__()
    self.qkv = torch.nn.Linear(8, 24)
    self.dropout = dropout

  def forward(self, x):
    q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
    p = self.dropout if self.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True).sum()


def test_attention_is_kept_whole_and_its_dropout_refused():
  x = torch.randn(2, 5, 8)
  with pytest.raises(UnsupportedOperatorError, match="scaled_dot_product_attention with dropout_p=0.1"):
    bridge_model(Attention(0.1).train(), {"x": x}, optax.sgd(0.1))
  model = Attention(0.1).eval()
  bridged = bridge_model(model, {"x": x}, optax.sgd(0.1))
  ops = [str(n.target) for n in bridged.captured.graph.nodes if n.op == "call_function"]
  assert "aten.scaled_dot_product_attention.default" in ops and "aten._softmax.default" not in ops
  loss = jax.jit(bridged.program.loss)(bridged.program.params, bridged.program.batch)
  assert abs(float(loss) - model(x).item()) <= 1e-5
