"""passes/compat.py: the jax version differences, checked on the jax installed here."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from passes import compat, shardings, tp_rules
from passes.plan import MESH_AXES, Plan


def test_parse_version():
  assert compat.parse_version("0.11.2") == (0, 11, 2)
  assert compat.parse_version("2.11.0+cu130") == (2, 11, 0)
  assert compat.parse_version("0.12.0.dev20260801") == (0, 12, 0)
  assert compat.parse_version("0.12.0rc1") == (0, 12, 0)
  with pytest.raises(ValueError, match="version number"):
    compat.parse_version("unknown")


def test_installed_jax_is_a_checked_release():
  assert compat.is_supported(), compat.support_note()
  assert compat.support_note() is None
  assert compat.is_supported((0, 11, 2)) and compat.is_supported((0, 10, 0))
  note = compat.support_note((0, 12, 0))
  assert "0.12.0" in note and "0.10.x, 0.11.x" in note


def test_meshes_name_their_axis_types_auto():
  """The step builder relies on Auto axes; jax main made AbstractMesh Explicit by default."""
  mesh = shardings.make_mesh(Plan(dp=2, tp=2, pp=2), jax.devices())
  assert mesh.axis_names == MESH_AXES
  assert mesh.axis_types == (AxisType.Auto,) * 3
  with pytest.raises(ValueError, match="needs 2 axis names"):
    compat.auto_mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("d",))


def test_call_primitives_cover_every_spelling():
  for name in ("jit", "pjit", "closed_call", "eval_jaxpr", "remat2", "custom_jvp_call", "custom_vjp_call"):
    assert name in compat.CALL_PRIMITIVES
  assert tp_rules._CALLS is compat.CALL_PRIMITIVES


def test_call_primitives_of_this_jax_are_listed():
  """Whatever call primitives this jax emits for jit, remat and custom_jvp are in the list."""
  def f(x):
    y = jax.jit(lambda v: v * 2)(x)
    y = jax.checkpoint(lambda v: jax.nn.relu(v) + 1)(y)
    return jax.nn.silu(y)
  names = {e.primitive.name for e in jax.make_jaxpr(f)(np.ones(3, np.float32)).jaxpr.eqns}
  assert {"jit", "remat2"} <= names
  calls = {n for n in names if n not in ("mul", "add", "logistic")}
  assert calls <= compat.CALL_PRIMITIVES, calls - compat.CALL_PRIMITIVES
