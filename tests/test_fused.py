"""The flax Llama's RMSNorm and SwiGLU custom VJPs (ap_xla/models/fused.py) against the plain
formulas differentiated by JAX, and the residuals they keep.

Tolerance: float32, forward and gradients within 1e-5 relative (per array, scaled by its largest
magnitude); bfloat16 inputs, within 2e-2 (the custom backward computes in float32 where the plain
one rounds each step to bf16: ~4e-3 per rounding).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ap_xla.models.fused import rms_norm, swiglu


def plain_rms(x, scale, eps=1e-6):
  var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  return (x * jax.lax.rsqrt(var + eps)).astype(x.dtype) * scale.astype(x.dtype)


def plain_swiglu(g, u):
  return jax.nn.silu(g) * u


def _close(a, b, rtol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= rtol * max(np.max(np.abs(b)), 1e-12)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_values_and_gradients_match_the_plain_formulas(dtype, rtol):
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(k[0], (2, 8, 32)).astype(dtype)
  scale = 1 + 0.1 * jax.random.normal(k[1], (32,))
  g, u = (jax.random.normal(k[i], (2, 8, 64)).astype(dtype) for i in (2, 3))
  w = jax.random.normal(k[4], (2, 8, 32))
  for fused, plain, args in ((lambda x, s: rms_norm(x, s, 1e-6), plain_rms, (x, scale)),
                             (swiglu, plain_swiglu, (g, u))):
    _close(jax.jit(fused)(*args), jax.jit(plain)(*args), rtol)
    loss = lambda f: (lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w[..., :1] * jnp.cos(f(*a).astype(jnp.float32))))
    grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1)))
    for a, b in zip(grad(fused)(*args), grad(plain)(*args)):
      assert a.dtype == b.dtype
      _close(a, b, rtol)


def saved_residuals(f, *args):
  """(array, '') per array the vjp closure of f keeps for the backward (its pytree leaves)."""
  return [(a, "") for a in jax.tree.leaves(jax.vjp(f, *args)[1]) if hasattr(a, "shape")]


def test_residuals_are_the_inputs_and_one_float32_per_row():
  """RMSNorm keeps x (bf16) and 1/rms ([..., 1] float32); SwiGLU keeps g and u: no float32 copy
  of an activation (the plain RMSNorm kept two float32 [.., dim] arrays)."""
  x = jnp.ones((2, 8, 32), jnp.bfloat16)
  res = saved_residuals(lambda x, s: rms_norm(x, s, 1e-6), x, jnp.ones((32,)))
  big_f32 = [a for a, _ in res if a.dtype == jnp.float32 and a.shape == x.shape]
  assert not big_f32 and any(a.shape == (2, 8, 1) and a.dtype == jnp.float32 for a, _ in res)
  plain = saved_residuals(plain_rms, x, jnp.ones((32,)))
  assert sum(a.dtype == jnp.float32 and a.shape == x.shape for a, _ in plain) == 2
  g = jnp.ones((2, 8, 64), jnp.bfloat16)
  assert sorted(a.shape for a, _ in saved_residuals(swiglu, g, g)) == [g.shape, g.shape]
