"""The GPipe pipeline computes what the single-device program computes, reduces gradients over
'data' once per step, and compiles in time flat in depth.

Tolerance: fp32 loss and gradients within 1e-5 relative (per leaf, scaled by the leaf's
largest magnitude), and the parameters after 3 steps of SGD with momentum and weight decay
(an update linear in the gradients) likewise; bf16 against the same bf16 program unsplit,
1e-2 (loss) and 5e-2 (gradients), as the micro-batch split changes the bf16 rounding of the
sums. (AdamW is checked on the unpipelined plans in test_step_equivalence.py, at 1e-4: Adam
divides each gradient element by its own magnitude, which amplifies round-off on near-zero
elements; its update is the same whatever the plan.)
"""
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from passes import pipeline
from passes.plan import MESH_AXES
from passes.program import Layers, Program
from tests.models import assert_tree_close, data_reductions

D, F, IN, OUT, B, L = 16, 32, 8, 4, 32, 8
RTOL = 1e-5


# ------------------------------------------------------------------ a tiny layered model

def _pre(p, batch):
  # aux: a float gate that depends on parameters (its gradient flows back through every
  # stage) and an int mask (no gradient).
  return batch["x"] @ p["w"], {"gate": jax.nn.sigmoid(batch["x"] @ p["g"]), "keep": batch["keep"]}


def _block(p, h, aux):
  mu = h.mean(-1, keepdims=True)
  n = (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"]
  return h + aux["gate"] * aux["keep"] * (jax.nn.gelu(n @ p["w1"]) @ p["w2"])


def _post(p, h, aux, batch):
  return jnp.mean((h @ p["w"] - batch["y"]) ** 2)


def make_program(num_blocks=L, batch=B, aux=True, seed=0) -> Program:
  k = jax.random.split(jax.random.PRNGKey(seed), 9)
  params = {
      "pre": {"w": jax.random.normal(k[0], (IN, D)) / IN ** .5, "g": jax.random.normal(k[1], (IN, 1))},
      "blocks": {"scale": 1 + 0.1 * jax.random.normal(k[2], (num_blocks, D)),
                 "w1": jax.random.normal(k[3], (num_blocks, D, F)) / D ** .5,
                 "w2": jax.random.normal(k[4], (num_blocks, F, D)) / F ** .5},
      "post": {"w": jax.random.normal(k[5], (D, OUT)) / D ** .5},
  }
  data = {"x": jax.random.normal(k[6], (batch, IN)), "y": jax.random.normal(k[7], (batch, OUT)),
          "keep": (jax.random.uniform(k[8], (batch, 1)) > 0.2).astype(jnp.int32)}
  if aux:
    layers = Layers(_pre, _block, _post)
  else:  # aux=None: the block reads only the hidden state
    layers = Layers(lambda p, b: (b["x"] @ p["w"], None),
                    lambda p, h, _: h + jnp.tanh(h @ p["w1"]) @ p["w2"] * p["scale"], _post)
  return Program(params=params, optimizer=optax.adamw(1e-2, weight_decay=0.1), batch=data,
                 layers=layers, name="tiny_pipeline")


PROGRAM = make_program()
# The equivalence grid's optimizer: linear in the gradient, so 3 steps keep the 1e-5 tolerance.
SGD = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.9))
STEPS = 3


def _train_step(loss_fn, tx):
  """(params, opt_state, batch) -> (params, opt_state, loss, grads): one step that also
  returns what it stepped with, so one compiled program checks loss, gradients and steps."""
  def step(p, s, b):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss, g
  return step


@functools.lru_cache(maxsize=None)
def reference():
  """Single-device loss and gradients, and the parameters after STEPS steps of SGD."""
  step = jax.jit(_train_step(PROGRAM.loss, SGD))
  p, s = PROGRAM.params, SGD.init(PROGRAM.params)
  p, s, loss, grads = step(p, s, PROGRAM.batch)
  for _ in range(STEPS - 1):
    p, s, _, _ = step(p, s, PROGRAM.batch)
  return loss, grads, p


def _mesh(pp, dp, tp) -> Mesh:
  return Mesh(np.array(jax.devices()[:pp * dp * tp]).reshape(pp, dp, tp), MESH_AXES)


def _block_specs(tp: bool, fsdp: bool):
  """Megatron-style TP on the MLP (w1 by column, w2 by row); FSDP on w1's input dim and scale."""
  w1 = [None, None]
  if fsdp:
    w1[0] = "data"
  if tp:
    w1[1] = "tensor"
  return {"scale": P("stage", "data" if fsdp else None), "w1": P("stage", *w1),
          "w2": P("stage", "tensor" if tp else None, None)}


def _specs(program, tp=False, fsdp=False):
  return {"pre": jax.tree.map(lambda _: P(), program.params["pre"]),
          "blocks": _block_specs(tp, fsdp),
          "post": jax.tree.map(lambda _: P(), program.params["post"])}


def _named(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _tp_block(p, h, aux):
  """The block with its weights constrained to their TP layout (as the step builder does)."""
  p = dict(p, w1=jax.lax.with_sharding_constraint(p["w1"], P(None, "tensor")),
           w2=jax.lax.with_sharding_constraint(p["w2"], P("tensor", None)))
  return _block(p, h, aux)


def _loss_fn(program, mesh, M, block_fn, block_specs, gather_dtype=None):
  return functools.partial(pipeline.pipeline_loss, program.layers, block_fn,
                           num_stages=mesh.shape["stage"], num_micro_batches=M, mesh=mesh,
                           block_specs=block_specs, gather_dtype=gather_dtype)


@functools.lru_cache(maxsize=None)
def compiled_case(pp, dp, tp, M, remat=False, fsdp=False):
  """The pipelined PROGRAM's SGD step, compiled once and run STEPS times.

  Returns (loss, grads) of the first step, the parameters after STEPS steps, the compiled
  step (for the HLO tests) and the mesh; cached so the HLO tests reuse the grid's compiles.
  """
  mesh = _mesh(pp, dp, tp)
  specs = _specs(PROGRAM, tp > 1, fsdp)
  block_fn = _tp_block if tp > 1 else _block
  if remat:
    block_fn = jax.checkpoint(block_fn, policy=jax.checkpoint_policies.nothing_saveable)
  shard = _named(mesh, specs)
  step = jax.jit(_train_step(_loss_fn(PROGRAM, mesh, M, block_fn, specs["blocks"]), SGD),
                 out_shardings=(shard, None, None, shard))
  params = jax.device_put(PROGRAM.params, shard)
  batch = jax.device_put(PROGRAM.batch, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    opt = SGD.init(params)
    compiled = step.lower(params, opt, batch).compile()
    params, opt, loss, grads = compiled(params, opt, batch)
    for _ in range(STEPS - 1):
      params, opt, _, _ = compiled(params, opt, batch)
  return loss, grads, params, compiled, mesh


def _check_against_reference(case):
  ref_loss, ref_grads, ref_params = reference()
  loss, grads, params, _, _ = case
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  assert_tree_close(grads, ref_grads, RTOL, "grad ")
  assert_tree_close(params, ref_params, RTOL, f"param after {STEPS} steps ")


# (stage, data, tensor) x M: every mesh of issue 3 with every M in {1, 2, 4, 8} (all valid for
# B = 32 and L = 8 blocks); loss, gradients and 3 optimizer steps for each.
GRID = [(shape, M) for shape in ((2, 4, 1), (2, 2, 2), (4, 2, 1), (8, 1, 1)) for M in (1, 2, 4, 8)]


@pytest.mark.parametrize("shape,M", GRID, ids=[f"pp{s[0]}_dp{s[1]}_tp{s[2]}_mb{m}" for s, m in GRID])
def test_loss_grads_and_steps_match_single_device(shape, M):
  _check_against_reference(compiled_case(*shape, M, False, False))


@pytest.mark.parametrize("shape,M,remat,fsdp", [((4, 2, 1), 2, True, False), ((2, 4, 1), 4, False, True),
                                                ((2, 2, 2), 4, True, True)],
                         ids=["remat", "fsdp", "remat_fsdp_tp"])
def test_recompute_and_fsdp_match_single_device(shape, M, remat, fsdp):
  _check_against_reference(compiled_case(*shape, M, remat, fsdp))


def test_bf16_matches_single_device_bf16():
  """bf16 hidden, aux and block weights (fp32 masters): the manual region's reductions
  compile on CPU (they run in fp32) and the result matches the same bf16 program unsplit.
  The FSDP block weights are gathered in bf16 (distribute_low_prec_param) in the lowered
  program; the CPU compiler widens every bf16 all-gather to f32, so this is read before it."""
  bf16 = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, t)
  layers = Layers(lambda p, b: bf16(_pre(p, b)), lambda p, h, a: _block(bf16(p), h, a),
                  lambda p, h, a, b: _post(p, h.astype(jnp.float32), a, b))
  prog = Program(params=PROGRAM.params, optimizer=PROGRAM.optimizer, batch=PROGRAM.batch, layers=layers)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(prog.loss))(prog.params, prog.batch)
  mesh = _mesh(4, 2, 1)
  specs = _specs(prog, fsdp=True)
  params = jax.device_put(prog.params, _named(mesh, specs))
  batch = jax.device_put(prog.batch, NamedSharding(mesh, P("data")))
  def gathers(gather_dtype):  # result types of the all-gathers in the lowered program
    vg = jax.jit(jax.value_and_grad(_loss_fn(prog, mesh, 2, layers.block, specs["blocks"], gather_dtype)))
    lowered = vg.lower(params, batch)
    return lowered, re.findall(r"stablehlo.all_gather.*-> (tensor<[^>]*>)", lowered.as_text())

  with jax.set_mesh(mesh):
    _, wide = gathers(None)
    lowered, narrow = gathers(jnp.bfloat16)
    loss, grads = lowered.compile()(params, batch)
  # The FSDP block leaves ('scale', 'w1') go from f32 to bf16 gathers; nothing else changes.
  assert sum("bf16" in t for t in wide) == 0 and sum("bf16" in t for t in narrow) == 2, (wide, narrow)
  assert len(wide) == len(narrow)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)
  assert_tree_close(grads, ref_grads, 5e-2)


# ------------------------------------------------------------------ gradient reduction

@pytest.mark.parametrize("shape,M,remat,fsdp", [((2, 4, 1), 4, False, False), ((2, 2, 2), 4, True, True),
                                                ((4, 2, 1), 4, False, False)],
                         ids=["dp", "fsdp_tp_remat", "pp4"])
def test_data_gradient_reduction_is_outside_the_loops(shape, M, remat, fsdp):
  *_, compiled, mesh = compiled_case(*shape, M, remat, fsdp)
  found = data_reductions(compiled, mesh)
  print(f"\n{shape} M={M}: data-group reductions (kind, runs per step): {found}")
  # Some reduction over 'data' exists (weight gradients), and every one runs once per step:
  # a collective inside the tick or layer loop runs M+S-1 or L/S times or more.
  assert found and all(count == 1 for _, count in found), found


def test_reduction_check_detects_a_reduction_inside_a_loop():
  """Control: the plain layer scan with automatic data parallelism reduces per layer inside
  the backward loop, and the check above sees it."""
  mesh = Mesh(np.array(jax.devices()).reshape(1, 8, 1), MESH_AXES)
  specs = _specs(PROGRAM)
  specs["blocks"] = jax.tree.map(lambda _: P(), specs["blocks"])
  params = jax.device_put(PROGRAM.params, _named(mesh, specs))
  batch = jax.device_put(PROGRAM.batch, NamedSharding(mesh, P("data")))
  compiled = jax.jit(jax.grad(PROGRAM.loss)).lower(params, batch).compile()
  assert any(count == L for _, count in data_reductions(compiled, mesh))


# ------------------------------------------------------------------ compile time

def _compile(num_blocks):
  # B=12 on (stage=4, data=2): 6 local examples do not split over 4 stages, so the output
  # is summed to every stage rather than scattered; M=3 is odd.
  prog = make_program(num_blocks=num_blocks, batch=12, aux=False)
  mesh = _mesh(4, 2, 1)
  specs = _specs(prog)
  params = jax.device_put(prog.params, _named(mesh, specs))
  batch = jax.device_put(prog.batch, NamedSharding(mesh, P("data")))
  loss = _loss_fn(prog, mesh, 3, prog.layers.block, specs["blocks"])
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
    seconds = time.perf_counter() - t0
    value, grads = compiled(params, batch)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(prog.loss))(prog.params, prog.batch)
  np.testing.assert_allclose(value, ref_value, rtol=RTOL)
  assert_tree_close(grads, ref_grads, RTOL)
  return seconds, len(compiled.as_text().splitlines())


def test_compile_time_flat_in_depth_and_aux_none():
  (t8, n8), (t64, n64) = _compile(8), _compile(64)
  print(f"\ncompile value_and_grad: 8 blocks {t8:.2f} s ({n8} HLO lines), 64 blocks {t64:.2f} s ({n64} lines)")
  assert abs(n64 - n8) < 0.05 * n8  # the program does not grow with depth: both loops are scans
  assert t64 < 3 * t8 + 1.0  # loose: the machine is shared


# ------------------------------------------------------------------ validation and helpers

def test_check_pipeline_reasons():
  assert pipeline.check_pipeline(8, 32, 2, 4, dp=4) is None
  assert "not divisible by num_stages(3)" in pipeline.check_pipeline(8, 32, 3, 1)
  assert "dp(4) * num_micro_batches(16)" in pipeline.check_pipeline(8, 32, 2, 16, dp=4)
  assert "num_micro_batches must be a positive int" in pipeline.check_pipeline(8, 32, 2, 0)


def test_run_stages_rejects_invalid_configurations():
  mesh = _mesh(2, 4, 1)
  loss = _loss_fn(PROGRAM, mesh, 16, _block, None)
  with pytest.raises(ValueError, match=r"batch_size\(32\) is not divisible by dp\(4\)"):
    jax.eval_shape(loss, PROGRAM.params, PROGRAM.batch)
  bad_stages = functools.partial(pipeline.pipeline_loss, PROGRAM.layers, _block, num_stages=4,
                                 num_micro_batches=1, mesh=mesh)
  with pytest.raises(ValueError, match=r"num_stages\(4\) must equal the size of the mesh's 'stage'"):
    jax.eval_shape(bad_stages, PROGRAM.params, PROGRAM.batch)
  bad_specs = dict(_block_specs(False, False), w1=P("stage", ("data", "tensor")))
  with pytest.raises(ValueError, match="sharded over 'data' alone"):
    jax.eval_shape(_loss_fn(PROGRAM, mesh, 1, _block, bad_specs), PROGRAM.params, PROGRAM.batch)


def test_bubble_fraction_and_stage_specs():
  assert pipeline.bubble_fraction(1, 8) == 0
  assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
  specs = pipeline.stage_param_specs(PROGRAM.params["blocks"])
  assert specs == {"scale": P("stage", None), "w1": P("stage", None, None), "w2": P("stage", None, None)}
  specs = pipeline.stage_param_specs(PROGRAM.params["blocks"], _block_specs(tp=True, fsdp=True))
  assert specs["w1"] == P("stage", "data", "tensor")
  with pytest.raises(ValueError, match="only the leading dim"):
    pipeline.stage_param_specs(PROGRAM.params["blocks"], {"scale": P(None, "stage"), "w1": P(), "w2": P()})
