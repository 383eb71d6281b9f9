"""Tiny programs shared by the tests: a flat MLP and a layered Llama-style model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ap_xla.models.llama import LlamaConfig, llama_program
from passes.program import Program

TINY_LLAMA = LlamaConfig(vocab=64, dim=32, layers=4, heads=4, ffn=64, seq=16)


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden, name="a")(x)
    x = nn.gelu(x)
    x = nn.Dense(self.hidden, name="zz")(x)
    x = nn.relu(x)
    return nn.Dense(4, name="q1")(x)


def mlp_program(batch=16, width=32, optimizer=None) -> Program:
  mlp = MLP()
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(k1, (batch, width))
  y = jax.random.normal(k2, (batch, 4))
  params = mlp.init(k3, x)["params"]

  def loss(p, b):
    return jnp.mean((mlp.apply({"params": p}, b["x"]) - b["y"]) ** 2)
  return Program(params=params, optimizer=optimizer or optax.adam(1e-2), batch={"x": x, "y": y},
                 loss_fn=loss, name="mlp")


def llama_tiny(batch=16, optimizer=None, cfg=TINY_LLAMA) -> Program:
  return llama_program(cfg, batch, optimizer=optimizer or optax.adamw(1e-3, weight_decay=0.1))


def assert_tree_close(actual, expected, rtol, what=""):
  """Leaf-wise |a - e| <= rtol * max|e| (a relative tolerance scaled by each leaf's magnitude)."""
  fa, fe = jax.tree.leaves(actual), jax.tree.leaves(expected)
  assert len(fa) == len(fe)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
  for path, a, e in zip(paths, fa, fe):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(np.max(np.abs(e)), 1e-12)
    err = np.max(np.abs(a - e)) / scale
    assert err <= rtol, f"{what}{path}: relative error {err:.3g} > {rtol}"


def data_reductions(compiled, mesh):
  """(kind, runs per step) of the all-reduces / reduce-scatters over the mesh's 'data' groups."""
  from passes.hlo_stats import analyze_hlo
  ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)  # partition ids in mesh order
  d = mesh.axis_names.index("data")
  groups = {tuple(sorted(g)) for g in np.moveaxis(ids, d, -1).reshape(-1, mesh.shape["data"]).tolist()}
  stats = analyze_hlo(compiled.as_text())
  return [(c.kind, c.count) for c in stats.collectives
          if c.kind in ("all-reduce", "reduce-scatter") and {tuple(sorted(g)) for g in c.groups} == groups]
