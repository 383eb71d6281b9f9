"""The bridged Llama in block form: pre -> scan(block) -> post, and 2 pipeline stages.

Runs on the simulated CPU devices of tests/conftest.py. Tolerance against torch eager:
1e-5 absolute on the loss and every gradient (fp32).
"""
import jax
import numpy as np
import optax
import pytest

from bridge import testing
from bridge.program import bridge_model
from bridge.state import by_torch_name
from passes import pipeline
from passes.plan import Plan
from passes.program import scan_blocks

# torchax asks JAX for int64 constants; without x64 they are int32, as intended.
pytestmark = pytest.mark.filterwarnings("ignore:Explicitly requested dtype int64:UserWarning")

LAYERS = 4  # two blocks per stage


@pytest.fixture(scope="module")
def llama():
  model, batch = testing.tiny_causal_lm("llama", layers=LAYERS), testing.lm_batch()
  out = model(**batch)
  out.loss.backward()
  torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
  bridged = bridge_model(model, batch, optax.adamw(1e-3))
  return bridged, out.loss.item(), torch_grads


def _check(bridged, loss, grads, torch_loss, torch_grads):
  assert abs(float(loss) - torch_loss) <= 1e-5, (float(loss), torch_loss)
  grads = by_torch_name(grads, bridged.param_names)
  assert set(grads) == set(torch_grads)
  for name, g in torch_grads.items():
    np.testing.assert_allclose(np.asarray(grads[name]), g, atol=1e-5, err_msg=name)


def test_pre_scan_post_matches_torch(llama):
  bridged, torch_loss, torch_grads = llama
  prog = bridged.program
  assert prog.num_blocks == LAYERS

  def loss_fn(params, batch):  # the block form, spelled out
    hidden, aux = prog.layers.pre(params["pre"], batch)
    hidden = scan_blocks(prog.layers.block, params["blocks"], hidden, aux)
    return prog.layers.post(params["post"], hidden, aux, batch)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(prog.params, prog.batch)
  _check(bridged, loss, grads, torch_loss, torch_grads)


def _mesh(plan):
  from passes import shardings
  return shardings.make_mesh(plan, jax.devices()[:plan.num_devices])


def test_two_pipeline_stages_match_torch(llama):
  bridged, torch_loss, torch_grads = llama
  prog = bridged.program
  plan = Plan(pp=2, mb=2)
  mesh = _mesh(plan)

  def loss_fn(params, batch):
    return pipeline.pipeline_loss(prog.layers, prog.layers.block, params, batch, num_stages=2,
                                  num_micro_batches=2, mesh=mesh)

  with jax.set_mesh(mesh):
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(prog.params, prog.batch)
  _check(bridged, loss, grads, torch_loss, torch_grads)


def test_two_pipeline_stages_through_the_training_step(llama):
  from passes.step import build_step
  bridged, torch_loss, torch_grads = llama
  plan = Plan(pp=2, mb=2)
  built = build_step(bridged.program, plan, jax.devices()[:plan.num_devices])
  loss, grads = built.loss_and_grad(bridged.program.params, bridged.program.batch)
  _check(bridged, loss, grads, torch_loss, torch_grads)


def test_tensor_parallel_groups_are_found_and_match_torch(llama):
  # The folded batched matmuls keep the heads visible, so the dataflow analysis finds the
  # Megatron groups of the bridged block (q/k/v -> o and gate/up -> down).
  from passes.build import build_plan, derive_program_tp
  bridged, torch_loss, torch_grads = llama
  rules = derive_program_tp(bridged.program)
  columns = sorted(sorted(p for p, _ in g.columns) for g in rules.groups)
  assert columns == [["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                     ["self_attn.k_proj.weight", "self_attn.q_proj.weight", "self_attn.v_proj.weight"]]
  plan = Plan(dp=2, tp=2, fsdp=True)
  built = build_plan(bridged.program, plan, jax.devices()[:plan.num_devices], rules)
  loss, grads = built.loss_and_grad(bridged.program.params, bridged.program.batch)
  _check(bridged, loss, grads, torch_loss, torch_grads)


def test_gradient_accumulation_weighs_micro_batches_by_their_labelled_tokens():
  # An HF LM loss is a mean over the labelled tokens: rows with 15, 1, 0 and 13 labels (row 2
  # has none). Micro-batches of one row each must be weighted by their token counts, and the
  # empty one (0/0) must count for nothing, to give torch's whole-batch loss and gradients.
  model, batch = testing.tiny_causal_lm("llama", layers=LAYERS), testing.lm_batch()
  batch["labels"][2] = -100
  out = model(**batch)
  out.loss.backward()
  torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
  bridged = bridge_model(model, batch, optax.adamw(1e-3))
  prog = bridged.program
  assert prog.loss_weight is not None
  assert float(prog.loss_weight(prog.batch)) == float((batch["labels"][:, 1:] != -100).sum())
  from passes.step import build_step
  for plan in (Plan(dp=2, mb=2), Plan(mb=4)):
    built = build_step(prog, plan, jax.devices()[:plan.num_devices])
    loss, grads = built.loss_and_grad(prog.params, prog.batch)
    _check(bridged, loss, grads, out.loss.item(), torch_grads)
