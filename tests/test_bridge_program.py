"""bridge_model's API: optimizers, errors, weights back to torch, meta-device models."""
import jax
import numpy as np
import optax
import pytest
import torch

from bridge import testing
from bridge.program import bridge_model
from passes.program import combine
from bridge.state import by_torch_name
from tests.test_bridge_blocks import Stack, _batch

# torchax asks JAX for int64 constants; without x64 they are int32, as intended.
pytestmark = pytest.mark.filterwarnings("ignore:Explicitly requested dtype int64:UserWarning")


def _mlp():
  torch.manual_seed(0)
  return testing.MLP(), testing.mlp_batch()


def test_an_optimizer_is_required():
  model, batch = _mlp()
  with pytest.raises(ValueError, match="needs optimizer="):
    bridge_model(model, batch, loss_fn=testing.mse_loss)
  with pytest.raises(TypeError, match="optimizer must be"):
    bridge_model(model, batch, optimizer="adamw", loss_fn=testing.mse_loss)
  with pytest.raises(ValueError, match="scheduler= is for torch optimizers"):
    bridge_model(model, batch, optax.adamw(1e-3), scheduler=object(), loss_fn=testing.mse_loss)


def test_batch_and_loss_errors_name_the_problem():
  model, batch = _mlp()
  with pytest.raises(TypeError, match="loss_fn="):  # MLP returns predictions, no loss
    bridge_model(model, batch, optax.sgd(0.1))
  with pytest.raises(TypeError, match="example_batch must be a dict"):
    bridge_model(model, [batch["x"]], optax.sgd(0.1), loss_fn=testing.mse_loss)
  with pytest.raises(ValueError, match="same leading"):
    bridge_model(model, {"x": batch["x"], "y": batch["y"][:3]}, optax.sgd(0.1), loss_fn=testing.mse_loss)
  with pytest.raises(ValueError, match="None of the batch keys"):
    bridge_model(model, {"inputs": batch["x"]}, optax.sgd(0.1), loss_fn=testing.mse_loss)


def test_loss_variants_and_forward():
  # ModelOutput.loss is covered by the LMs, loss_fn by the MLP; here the tuple and outputs.
  torch.manual_seed(0)
  model, batch = testing.CNN(), testing.image_batch()
  bridged = bridge_model(model, batch, optax.sgd(0.1))
  loss, logits = model(**batch)
  out = bridged.forward(bridged.program.params, bridged.program.batch)
  assert isinstance(out, tuple) and len(out) == 2
  assert abs(float(out[0]) - loss.item()) <= 1e-5
  np.testing.assert_allclose(np.asarray(out[1]), logits.detach().numpy(), atol=1e-5)


class ConvBN(torch.nn.Module):

  def __init__(self):
    super().__init__()
    torch.manual_seed(0)
    self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)
    self.fc.bias.requires_grad_(False)

  def forward(self, x, y):
    h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
    return torch.nn.functional.cross_entropy(self.fc(h), y)


def test_buffers_are_constants_and_frozen_weights_untrained_params():
  model = ConvBN()
  batch = {"x": torch.randn(4, 3, 8, 8), "y": torch.tensor([0, 1, 1, 0])}
  bridged = bridge_model(model, batch, optax.sgd(0.1))
  assert set(bridged.program.params) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight",
                                         "fc.bias"}
  assert bridged.program.trainable == {n: n != "fc.bias" for n in bridged.program.params}
  assert bridged.trainable_names["fc.bias"] is None
  assert not any(n.startswith(("conv", "bn.weight", "bn.bias", "fc")) for n in bridged.captured.constant_values)
  assert any("buffer updates are not carried over" in line and "bn.running_mean" in line
             for line in bridged.structure_log)
  # The torch one-liner refuses such a model (tests/test_torch_oneliner.py); it reads this.
  assert set(bridged.captured.mutated_buffers) == {"bn.running_mean", "bn.running_var",
                                                   "bn.num_batches_tracked"}
  prog = bridged.program
  trained, frozen = prog.split(prog.params)
  loss, grads = jax.value_and_grad(lambda t: prog.loss(combine(t, frozen), prog.batch))(trained)
  torch_loss = model(**batch)  # train mode: batch statistics, like the program
  torch_loss.backward()
  assert abs(float(loss) - torch_loss.item()) <= 1e-5
  assert grads["fc.bias"] is None and model.fc.bias.grad is None
  for name, g in grads.items():
    if g is None:
      continue
    np.testing.assert_allclose(np.asarray(g), model.get_parameter(name).grad.numpy(), atol=1e-5)


def test_to_torch_and_from_torch_round_trip_with_stacks_and_ties():
  model = Stack()
  bridged = bridge_model(model, _batch(), optax.sgd(0.1))
  params = bridged.from_torch()
  jax.tree.map(np.testing.assert_array_equal, params, bridged.program.params)
  new = jax.tree.map(lambda x: x + 1.0, params)
  before = {n: p.detach().clone() for n, p in model.named_parameters()}
  bridged.to_torch(new)
  for name, p in model.named_parameters():
    if name.startswith("shared."):  # not read by the loss: not in the program, untouched
      torch.testing.assert_close(p, before[name])
    else:
      torch.testing.assert_close(p.detach(), before[name] + 1.0, msg=name)
  assert model.head.weight is model.embed.weight  # the tie survives
  np.testing.assert_array_equal(model.stages[2].fc.weight.detach().numpy(), new["blocks"]["fc.weight"][2])
  with pytest.raises(ValueError, match="structure of param_names"):
    bridged.to_torch(new["blocks"])


def test_torch_optimizer_groups_become_labels_of_the_jax_params():
  model, batch = _mlp()
  decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
  no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
  opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
  bridged = bridge_model(model, batch, opt, loss_fn=testing.mse_loss)
  prog = bridged.program
  # Two torch steps vs two optax steps with per-group weight decay.
  for _ in range(2):
    opt.zero_grad()
    testing.mse_loss(model(batch["x"]), batch).backward()
    opt.step()
  params, state = prog.params, prog.optimizer.init(prog.params)
  for _ in range(2):
    grads = jax.grad(prog.loss)(params, prog.batch)
    updates, state = prog.optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for name, p in model.named_parameters():
    np.testing.assert_allclose(np.asarray(params[name]), p.detach().numpy(), atol=1e-6, err_msg=name)


def test_stacked_weights_must_share_an_optimizer_group():
  model = Stack()
  first = list(model.stages[0].parameters())
  rest = [p for p in model.parameters() if all(p is not q for q in first)]
  opt = torch.optim.AdamW([{"params": rest}, {"params": first, "lr": 1e-4}])
  with pytest.raises(ValueError, match="same param group"):
    bridge_model(model, _batch(), opt)


def test_parameters_missing_from_the_optimizer_are_an_error():
  model, batch = _mlp()
  opt = torch.optim.SGD(model.layers[0].parameters(), lr=0.1)
  with pytest.raises(ValueError, match="no param group holding"):
    bridge_model(model, batch, opt, loss_fn=testing.mse_loss)


def test_torch_optimizer_with_a_block_stack_and_a_tie():
  # Stacked leaves stand for L torch parameters and the tied embedding is two leaves (pre and
  # post): two AdamW steps still match torch's, which holds one tensor for both names.
  model, batch = Stack(), _batch()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
  bridged = bridge_model(model, batch, opt)
  prog = bridged.program
  params, opt_state = prog.params, prog.optimizer.init(prog.params)
  for _ in range(2):
    grads = jax.grad(prog.loss)(params, prog.batch)
    updates, opt_state = prog.optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  for _ in range(2):
    opt.zero_grad()
    model(**batch)[0].backward()
    opt.step()
  np.testing.assert_array_equal(params["pre"]["embed.weight"], params["post"]["embed.weight"])
  flat = by_torch_name(params, bridged.param_names)
  assert set(flat) == {n for n, _ in model.named_parameters()} - {"shared.weight", "shared.bias"}
  for name, p in model.named_parameters():
    if name in flat:
      np.testing.assert_allclose(np.asarray(flat[name]), p.detach().numpy(), atol=2e-6, err_msg=name)


def test_meta_device_model_gives_shapes_only():
  model = testing.tiny_causal_lm("llama", device="meta")
  bridged = bridge_model(model, testing.lm_batch(), optax.adamw(1e-3))
  prog = bridged.program
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(prog.params))
  assert all(p.is_meta for p in model.parameters())  # nothing was materialized
  assert prog.params["blocks"]["self_attn.q_proj.weight"].shape == (2, 32, 32)
  assert bridged.split.container == "model.layers"
  # The pass compiles from shapes: the whole training step lowers and compiles.
  def step(params, opt_state, batch):
    grads = jax.grad(prog.loss)(params, batch)
    updates, opt_state = prog.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  opt_state = jax.eval_shape(prog.optimizer.init, prog.params)
  compiled = jax.jit(step).lower(prog.params, opt_state, prog.abstract().batch).compile()
  assert compiled.memory_analysis().argument_size_in_bytes > 4 * prog.num_params
  with pytest.raises(ValueError, match="ShapeDtypeStruct"):
    bridged.to_torch(prog.params)


def test_loss_weight_only_for_a_ratio_of_sums_over_the_batch():
  model, batch = _mlp()  # an MSE over the examples: micro-batches weigh the same
  assert bridge_model(model, batch, optax.sgd(0.1), loss_fn=testing.mse_loss).program.loss_weight is None
  # a sum divided by a count of the batch: weighted by that count
  def masked(outputs, b):
    keep = (b["y"][:, 0] > 0).float()
    return ((outputs - b["y"]) ** 2).sum(-1).mul(keep).sum() / keep.sum()
  prog = bridge_model(model, batch, optax.sgd(0.1), loss_fn=masked).program
  assert float(prog.loss_weight(prog.batch)) == float((batch["y"][:, 0] > 0).sum())
  # a divisor that reads the parameters is not a weight of the batch
  def by_norm(outputs, b):
    return ((outputs - b["y"]) ** 2).sum() / outputs.abs().sum()
  assert bridge_model(model, batch, optax.sgd(0.1), loss_fn=by_norm).program.loss_weight is None
