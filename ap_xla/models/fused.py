"""RMSNorm and SwiGLU with the residuals a fused GPU kernel keeps (custom VJPs).

Differentiated as written, `x * rsqrt(mean(x.astype(f32)**2))` in a bf16 program keeps two
float32 copies of its [batch, seq, dim] input for the backward (the upcast and square's 2x)
besides two bf16 ones, and `silu(g) * u` keeps sigmoid(g) and silu(g) besides g and u: the
flax Llama's no-recomputation residuals were ~2x what a bf16 PyTorch or MaxText program keeps.
Here the forward computes the same values, and the backward recomputes the cheap elementwise
parts from what a fused kernel saves: RMSNorm its input (in its dtype) and the per-row float32
1/rms; SwiGLU its two inputs (the gate and up matmuls' outputs, saved anyway).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps: float):
  """`(x / rms(x)) * scale`, normalised in float32 and cast back to x's dtype before the scale."""
  return _rms_fwd(x, scale, eps)[0]


def _rms_fwd(x, scale, eps):
  xf = x.astype(jnp.float32)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return (xf * rstd).astype(x.dtype) * scale.astype(x.dtype), (x, scale, rstd)


def _rms_bwd(eps, res, dy):
  x, scale, rstd = res
  n = x.astype(jnp.float32) * rstd  # the normalised input, recomputed
  dyf = dy.astype(jnp.float32)
  dscale = jnp.sum(dyf * n.astype(x.dtype).astype(jnp.float32), axis=tuple(range(x.ndim - 1)))
  dn = dyf * scale.astype(x.dtype).astype(jnp.float32)
  dx = rstd * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_fwd, _rms_bwd)


@jax.custom_vjp
def swiglu(g, u):
  """`silu(g) * u` (SwiGLU's gating), in the inputs' dtype."""
  return jax.nn.silu(g) * u


def _swiglu_fwd(g, u):
  return swiglu(g, u), (g, u)


def _swiglu_bwd(res, dy):
  g, u = res
  gf, uf, dyf = g.astype(jnp.float32), u.astype(jnp.float32), dy.astype(jnp.float32)
  sig = jax.nn.sigmoid(gf)
  dg = dyf * uf * sig * (1 + gf * (1 - sig))
  du = dyf * gf * sig
  return dg.astype(g.dtype), du.astype(u.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
