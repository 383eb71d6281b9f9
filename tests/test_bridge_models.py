"""Bridged models against torch eager: loss, gradients, AdamW steps, outputs, block detection.

Every model is bridged with its torch AdamW, mapped to optax by bridge.optim (stacked block
leaves and tied weights included).

Tolerances (fp32, matmul precision 'highest'): loss and gradients 1e-5 absolute; parameters
after 3 AdamW steps 2e-5 absolute (Adam divides by sqrt(v), so gradient noise of 1e-7 on
near-zero entries moves an update by up to ~lr * 1e-3).
"""
import copy

import jax
import numpy as np
import optax
import pytest
import torch

from bridge import testing
from bridge.program import bridge_model
from bridge.state import by_torch_name

# torchax asks JAX for int64 constants; without x64 they are int32, as intended.
pytestmark = pytest.mark.filterwarnings("ignore:Explicitly requested dtype int64:UserWarning")

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1
STEPS = 3


def _torch_adamw(model):
  return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


def _torch_loss(model, batch, loss_fn=None):
  inputs = {k: v for k, v in batch.items() if k != "y"}
  out = model(**inputs)
  if loss_fn is not None:
    return loss_fn(out, batch), out
  return (out.loss if hasattr(out, "loss") else out[0]), out


def _torch_reference(model, batch, loss_fn=None):
  """Loss and grads of step 0, then the parameters after STEPS AdamW steps (on a copy)."""
  model = copy.deepcopy(model)
  opt = _torch_adamw(model)
  losses, grads = [], None
  for step in range(STEPS):
    opt.zero_grad()
    loss, _ = _torch_loss(model, batch, loss_fn)
    loss.backward()
    if step == 0:
      grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    losses.append(loss.item())
    opt.step()
  return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _jax_run(bridged):
  prog = bridged.program

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(prog.loss)(params, prog.batch)
    updates, opt_state = prog.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  params, state = prog.params, prog.optimizer.init(prog.params)
  losses, grads0 = [], None
  for i in range(STEPS):
    params, state, loss, grads = step(params, state)
    losses.append(float(loss))
    if i == 0:
      grads0 = grads
  return losses, grads0, params


def _max_err(jax_by_name, torch_by_name):
  assert set(jax_by_name) <= set(torch_by_name)
  return max(float(np.max(np.abs(np.asarray(jax_by_name[n]) - torch_by_name[n].numpy())))
             for n in jax_by_name)


class Case:
  """One model: bridged once, run once in torch and in JAX (shared by the tests below)."""

  def __init__(self, model, batch, optimizer, loss_fn=None):
    self.model, self.batch, self.loss_fn = model, batch, loss_fn
    self.torch = _torch_reference(model, batch, loss_fn)
    self.bridged = bridge_model(model, batch, optimizer(model), loss_fn=loss_fn)
    self.jax = _jax_run(self.bridged)


def _names(bridged):
  """Torch names of every tensor the program holds (aliases of tied tensors included)."""
  names = set(by_torch_name(bridged.program.params, bridged.param_names))
  return names | {a for n in names for a in bridged.tied.get(n, ())}


# Bridge-level checks on a few architectures, in both attention paths (every architecture of
# testing.CAUSAL_LMS trains through ap-xla in tests/test_torch_architectures.py).
BRIDGED = [("llama", "sdpa"), ("gpt2", "eager"), ("opt", "eager")]


@pytest.fixture(scope="module", params=BRIDGED, ids=[f"{a}-{attn}" for a, attn in BRIDGED])
def lm(request):
  arch, attn = request.param
  model = testing.tiny_causal_lm(arch, attn=attn)
  return arch, Case(model, testing.lm_batch(), _torch_adamw)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def small(request):
  if request.param == "mlp":
    torch.manual_seed(0)
    return Case(testing.MLP(), testing.mlp_batch(), _torch_adamw, loss_fn=testing.mse_loss)
  torch.manual_seed(0)
  return Case(testing.CNN(), testing.image_batch(), _torch_adamw)


def _check_loss_and_grads(case):
  (t_losses, t_grads, _), (j_losses, j_grads, _) = case.torch, case.jax
  assert abs(j_losses[0] - t_losses[0]) <= 1e-5, (j_losses[0], t_losses[0])
  grads = by_torch_name(j_grads, case.bridged.param_names, sum_duplicates=True)
  trained = {n for n, p in case.model.named_parameters() if p.requires_grad}
  assert set(grads) == trained, set(grads) ^ trained
  assert _max_err(grads, t_grads) <= 1e-5


def _check_adamw(case):
  (t_losses, _, t_params), (j_losses, _, j_params) = case.torch, case.jax
  np.testing.assert_allclose(j_losses, t_losses, atol=1e-5)
  assert _max_err(by_torch_name(j_params, case.bridged.param_names), t_params) <= 2e-5


def test_lm_loss_and_grads_match_torch(lm):
  _check_loss_and_grads(lm[1])


def test_lm_adamw_steps_match_torch(lm):
  _check_adamw(lm[1])


def test_lm_block_stack_is_the_decoder_layers(lm):
  arch, case = lm
  split = case.bridged.split
  assert split is not None, case.bridged.structure_log
  assert split.container == testing.CAUSAL_LMS[arch]
  assert split.num_blocks == 2 and case.bridged.program.num_blocks == 2
  layer_cls = type(case.model.get_submodule(split.container)[0]).__name__
  assert split.block_class == layer_cls
  blocks = case.bridged.param_names["blocks"]
  container = split.container
  assert all(names == tuple(f"{container}.{i}.{rel}" for i in range(2)) for rel, names in blocks.items())


def test_lm_forward_outputs_and_smaller_batches(lm):
  _, case = lm
  prog = case.bridged.program
  _, t_out = _torch_loss(case.model, case.batch)
  out = case.bridged.forward(prog.params, prog.batch)
  np.testing.assert_allclose(np.asarray(out["logits"]), t_out.logits.detach().numpy(), atol=1e-5)
  # The export has a symbolic batch: the same program runs on 2 of the 4 rows.
  half = {k: v[1:3] if isinstance(v, torch.Tensor) else v for k, v in case.batch.items()}
  t_loss, _ = _torch_loss(case.model, half)
  loss = jax.jit(prog.loss)(prog.params, {k: v[1:3] for k, v in prog.batch.items()})
  assert abs(float(loss) - t_loss.item()) <= 1e-5


def test_lm_params_are_keyed_by_torch_names(lm):
  _, case = lm
  assert _names(case.bridged) == {n for n, _ in case.model.named_parameters(remove_duplicate=False)}
  # use_cache=False is closed over: the program's batch holds the tensors only.
  assert set(case.bridged.program.batch) == {"input_ids", "attention_mask", "labels"}


def test_small_models_loss_and_grads_match_torch(small):
  _check_loss_and_grads(small)


def test_small_models_adamw_steps_match_torch(small):
  _check_adamw(small)


def test_small_models_are_flat_with_a_reason(small):
  bridged = small.bridged
  assert bridged.program.layers is None and bridged.split is None
  assert any("no block stack" in line for line in bridged.structure_log)
  if isinstance(small.model, testing.MLP):  # its Linear list is tried and rejected, with why
    assert any("'layers' (3 x Linear" in line and "not a block stack" in line
               for line in bridged.structure_log), bridged.structure_log
