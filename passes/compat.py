"""What differs between the jax versions ap-xla runs on (0.10.x and 0.11.x), in one place.

The CPU development setup pins jax 0.10.2; the GPU machine the project is measured on has jax
0.11.2 (with the CUDA 13 plugin). Checked against the jax sources at the tags jax-v0.10.2 and
jax-v0.11.0 and at main of 2026-08-08 (which calls itself 0.11.1), for every jax name that
`passes/`, `bridge/`, `ap_xla/` and `benchmarks/` use and for torchax 0.0.13's jax imports.

Unchanged across them, so used directly: `jax.shard_map(f, mesh=, in_specs=, out_specs=,
axis_names=, check_vma=)`, `lax.pcast(x, axes, to='varying')`, `jax.sharding.Mesh` (its default
axis type stays Auto), `jax.make_mesh` (Explicit by default in both), `jax.set_mesh`,
`jax.typeof`, `Lowered.compile(compiler_options=)`, `Compiled.memory_analysis()` /
`cost_analysis()` / `as_text()`, `jax.checkpoint_policies.*` (a submodule from 0.11.0,
attribute access unchanged), `jax.extend.core.{ClosedJaxpr, Jaxpr, Literal}`,
`jax.nn.dot_product_attention` (same signature; `implementation=None` still means 'xla'), the
persistent compilation cache's config names, `Device.memory_stats()`, and the primitive names
the tensor-parallel analysis reads (jit, scan, while, cond, remat2, custom_jvp_call,
custom_vjp_call, dot_general, shard_map and the lax element-wise ops).

What changed, and what ap-xla does about it:
  - After 0.11.0 (jax main, 2026-07-29) the `call` and `closed_call` primitives became one,
    `eval_jaxpr` (parameter `call_jaxpr`): `CALL_PRIMITIVES` names all three spellings.
  - After 0.11.0 `AbstractMesh`'s default axis type became Explicit (Mesh's stays Auto). The
    step builder relies on Auto axes (GSPMD propagation), so meshes are made by `auto_mesh`,
    which names the axis types instead of trusting a default.
  - 0.11.0: `jax.numpy.empty` returns uninitialized memory (ap-xla does not use it); deprecated
    `jax.core` and `jax.interpreters.pxla` names were removed (ap-xla uses `jax.extend.core`);
    Python 3.11 is no longer supported (the CPU setup, on 3.11, stays on 0.10.2).
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# The releases this module was checked against: 0.10.x and 0.11.x.
SUPPORTED = ((0, 10), (0, 11))

# Call-like primitives whose sub-jaxpr takes exactly the call's operands (inlined by analyses).
# 'closed_call' / 'call' up to jax 0.11.0; 'eval_jaxpr' after it.
CALL_PRIMITIVES = frozenset({"pjit", "jit", "closed_call", "call", "eval_jaxpr", "core_call", "remat",
                             "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call",
                             "custom_vjp_call_jaxpr"})


def parse_version(text: str) -> tuple[int, ...]:
  """The leading numeric release of a version string: '0.11.2' -> (0, 11, 2), '2.11.0+cu130' ->
  (2, 11, 0), '0.12.0.dev20260801' -> (0, 12, 0).

  Raises:
    ValueError: the string does not start with a number.
  """
  m = re.match(r"\s*(\d+(?:\.\d+)*)", text)
  if not m:
    raise ValueError(f"Cannot read a version number from {text!r}; expected e.g. '0.11.2'.")
  return tuple(int(x) for x in m.group(1).split("."))


JAX_VERSION = parse_version(jax.__version__)


def is_supported(version: tuple[int, ...] = JAX_VERSION) -> bool:
  """Whether a jax version is one of the releases this module was checked against."""
  return tuple(version[:2]) in SUPPORTED


def support_note(version: tuple[int, ...] = JAX_VERSION) -> str | None:
  """A warning to log when the running jax was not checked (None when it was)."""
  if is_supported(version):
    return None
  checked = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
  return (f"jax {'.'.join(map(str, version))} is not among the versions ap-xla was checked "
          f"against ({checked}); see passes/compat.py for what differed between them.")


def auto_mesh(devices, axis_names) -> Mesh:
  """A Mesh whose axes are all of type Auto (GSPMD decides the layouts between constraints).

  Args:
    devices: a numpy array of devices, shaped like the mesh.
    axis_names: one name per array dimension.

  Example:
    >>> auto_mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'tensor'))
  """
  devices = np.asarray(devices, dtype=object)
  names = tuple(axis_names)
  if devices.ndim != len(names):
    raise ValueError(f"auto_mesh: a device array of shape {devices.shape} needs {devices.ndim} axis "
                     f"names, got {names}.")
  return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))
