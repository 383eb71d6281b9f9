"""The torch one-liner against plain torch: the same loop, with and without ap-xla.

Every test runs one torch loop twice, on two copies of one model: in plain torch, and with
`enable_advanced_parallelization(mixed_precision=False)` on 8 simulated devices (the plan
the search picks: data and tensor parallel here). Tolerances (fp32, matmul precision
'highest'): losses 1e-5 absolute; parameters 5e-5 absolute (Adam divides by sqrt(v): a
1e-7 difference in a near-zero gradient moves an update by up to ~lr * 1e-3 per step).
"""
import contextlib
import copy
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ap_xla
from ap_xla import torch_frontend
from ap_xla.torch_frontend import UnsupportedUsageError
from ap_xla.torch_frontend import intercept
from ap_xla.torch_frontend.sync import APParam

LOSS_TOL, PARAM_TOL = 1e-5, 5e-5


@pytest.fixture(scope="module", autouse=True)
def plan_cache(tmp_path_factory):
  """One plan cache for this file: the same model searched again is read back."""
  old = os.environ.get("AP_XLA_CACHE_DIR")
  os.environ["AP_XLA_CACHE_DIR"] = str(tmp_path_factory.mktemp("plan_cache"))
  yield
  if old is None:
    os.environ.pop("AP_XLA_CACHE_DIR")
  else:
    os.environ["AP_XLA_CACHE_DIR"] = old


@pytest.fixture
def ap():
  """AP enabled as a script enables it; afterwards every model is given back to torch.

  FSDP and pipelining are pinned off to keep the search short (the MLP and Llama tests
  below search everything).
  """
  with enabled(distribute_parameter=False, pipeline_parallel=False):
    yield


@contextlib.contextmanager
def enabled(**options):
  ap_xla.enable_advanced_parallelization(mixed_precision=False, **options)
  torch_frontend.install()  # a no-op once enable_advanced_parallelization installs it itself
  try:
    yield
  finally:
    torch_frontend.uninstall()
    ap_xla.disable_advanced_parallelization()


class Regressor(torch.nn.Module):
  """A plain MLP whose forward returns (loss, predictions)."""

  def __init__(self, dims=(16, 32, 32, 4)):
    super().__init__()
    self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

  def forward(self, x, y):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      x = torch.tanh(x) if i < len(self.layers) - 1 else x
    return F.mse_loss(x, y), x


def regressor(seed=0):
  torch.manual_seed(seed)
  return Regressor()


def mlp_batches(n=3, batch=16, seed=0):
  g = torch.Generator().manual_seed(seed)
  return [{"x": torch.randn(batch, 16, generator=g), "y": torch.randn(batch, 4, generator=g)}
          for _ in range(n)]


def adamw(model, lr=1e-2):
  return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def loop(model, opt, batches, steps, accumulate=1, sched=None, loss_of=lambda out: out[0]):
  """The plain torch loop of the issue; returns the losses."""
  losses = []
  for i in range(steps):
    for k in range(accumulate):
      loss = loss_of(model(**batches[(i * accumulate + k) % len(batches)]))
      (loss / accumulate).backward()
      losses.append(loss.item())
    opt.step()
    opt.zero_grad()
    if sched is not None:
      sched.step()
  return losses


def params_of(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(a, b, tol, what):
  if isinstance(a, dict):
    assert a.keys() == b.keys()
    for k in a:
      assert_close(a[k], b[k], tol, f"{what}[{k}]")
    return
  err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


def twins(make=regressor):
  model = make()
  return model, copy.deepcopy(model)


# -- the loop of the issue, against torch ----------------------------------------------------

@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
  """A tiny Llama trained 5 steps by the same loop in torch and with the one-liner.

  The plan is pinned to a pipeline (2 stages x 2 micro-batches x 4 data parallel) so that the
  test is short and covers the pipelined step; the search picks among all plans elsewhere.
  """
  from bridge import testing
  batches = [testing.lm_batch(8, 16, seed=s) for s in range(3)]
  for b in batches:
    b.pop("use_cache")  # the loop passes what a data loader gives
  ref, model = twins(lambda: testing.tiny_causal_lm("llama"))
  ref_losses = loop(ref, adamw(ref, 1e-3), batches, 5, loss_of=lambda out: out.loss)
  with enabled(num_stages=2, num_micro_batches=2, distribute_parameter=False,
               activation_recomputation=False):
    opt = adamw(model, 1e-3)
    losses = loop(model, opt, batches, 5, loss_of=lambda out: out.loss)
    out = model(**batches[0])
    logits_train = out.logits.detach().clone()  # read before the step: lazily computed
    out.loss.backward()
    opt.zero_grad()
    with torch.no_grad():
      no_grad = model(**batches[1])
    model.eval()
    with torch.no_grad():
      evaluated = model(**batches[1])
    model.train()
    session = intercept.session_of(model)
    state = params_of(model)
  with torch.no_grad():
    ref_logits_train = ref(**batches[0]).logits
    ref_out = ref(**batches[1])
  return dict(ref_losses=ref_losses, losses=losses, ref_state=params_of(ref), state=state,
              logits_train=logits_train, ref_logits_train=ref_logits_train, no_grad=no_grad,
              evaluated=evaluated, ref_out=ref_out, plan=session.phase.plan)


def test_llama_loop_matches_torch(llama_runs):
  r = llama_runs
  assert_close(r["losses"], r["ref_losses"], LOSS_TOL, "losses")
  assert_close(r["state"], r["ref_state"], PARAM_TOL, "state_dict")
  assert (r["plan"].pp, r["plan"].mb, r["plan"].dp) == (2, 2, 4)


def test_llama_outputs_and_forward_only_calls(llama_runs):
  r = llama_runs
  assert_close(r["logits_train"], r["ref_logits_train"], 1e-4, "lazy logits of a training forward")
  for name in ("no_grad", "evaluated"):  # JAX forward (train mode) and torch eager (eval mode)
    out = r[name]
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert_close(out.loss, r["ref_out"].loss, LOSS_TOL, f"{name} loss")
    assert_close(out.logits, r["ref_out"].logits, 1e-4, f"{name} logits")


def test_mlp_loop_matches_torch(caplog):
  ref, model = twins()
  batches = mlp_batches()
  ref_losses = loop(ref, adamw(ref), batches, 5)
  with enabled(), caplog.at_level(logging.INFO, logger="ap_xla"):
    losses = loop(model, adamw(model), batches, 5)
    assert all(type(p) is APParam for p in model.parameters())
    assert torch.nn.Module.__call__ is intercept._ap_call
    report = ap_xla.plan_report(model)  # what AP chose, and every candidate it looked at
    assert report is not None and f"ap-xla took over Regressor: {report.plan}" in caplog.text
    assert report.candidates[0].plan == report.plan and report.candidates[0].verdict == "chosen"
    assert "Plan(" in report.table(limit=3) and ap_xla.plan_report(ref) is None
  assert_close(losses, ref_losses, LOSS_TOL, "losses")
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "state_dict")
  assert "ap-xla plan for Regressor with batch 16" in caplog.text


def test_gradient_accumulation_scales_by_grad_output(ap):
  ref, model = twins()
  batches = mlp_batches(6)
  opt_ref, opt = adamw(ref), adamw(model)
  ref_losses = loop(ref, opt_ref, batches, 3, accumulate=3)
  losses = loop(model, opt, batches, 3, accumulate=3)
  assert_close(losses, ref_losses, LOSS_TOL, "losses")
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "params")

  # Two forwards, one backward of a weighted sum; then a step without zero_grad in between.
  def odd_loop(m, opt):
    out = []
    for i in range(2):
      l1, l2 = m(**batches[0])[0], m(**batches[1])[0]
      (0.25 * l1 + 2.0 * l2).backward()
      opt.step()  # no zero_grad: the next backward adds to these gradients, as torch does
      out += [l1.item(), l2.item()]
    opt.zero_grad()
    return out
  assert_close(odd_loop(model, opt), odd_loop(ref, opt_ref), LOSS_TOL, "weighted losses")
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "params")


def test_zero_grad_variants(ap):
  ref, model = twins()
  batches = mlp_batches()

  def run(m):
    opt = adamw(m)
    losses = loop(m, opt, batches, 2)
    m(**batches[0])[0].backward()
    opt.zero_grad(set_to_none=False)  # zeros, not None: torch still steps (decay, moments)
    opt.step()
    m(**batches[1])[0].backward()
    m.zero_grad()  # the module's zero_grad clears the same gradients
    opt.step()  # no gradients: torch skips every parameter
    return losses + loop(m, opt, batches, 2)
  assert_close(run(model), run(ref), LOSS_TOL, "losses")
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "params")


def test_eval_and_no_grad_use_the_trained_state(ap):
  ref, model = twins()
  batches = mlp_batches()
  opts = adamw(ref), adamw(model)
  loop(ref, opts[0], batches, 2)
  loop(model, opts[1], batches, 2)
  with torch.no_grad():
    assert_close(model(**batches[2])[1], ref(**batches[2])[1], 1e-5, "no_grad outputs")
  model.eval()
  ref.eval()
  assert_close(model(**batches[2])[1].detach(), ref(**batches[2])[1].detach(), 1e-5, "eval outputs")
  model.train()
  ref.train()
  assert_close(loop(model, opts[1], batches, 2), loop(ref, opts[0], batches, 2), LOSS_TOL,
               "training after eval")


def test_partial_last_batch_replans_or_reuses(ap, caplog):
  ref, model = twins()
  g = torch.Generator().manual_seed(3)
  batches = [{"x": torch.randn(b, 16, generator=g), "y": torch.randn(b, 4, generator=g)}
             for b in (16, 16, 5, 16, 8)]
  ref_losses = loop(ref, adamw(ref), batches, 5)
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    losses = loop(model, adamw(model), batches, 5)
  assert_close(losses, ref_losses, LOSS_TOL, "losses")
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "params")
  assert "batch of 5" in caplog.text and "re-planning" in caplog.text
  assert "batch of 8" in caplog.text and "reuses" in caplog.text  # dp x mb of the plan divides 8
  assert caplog.text.count("ap-xla plan for Regressor with batch 16") == 1  # 16 again: no new plan


def test_lr_schedulers_are_honoured_exactly(ap):
  def setup(m):
    decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in m.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0, "lr": 3e-2}],
                            lr=1e-2, weight_decay=0.1)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 2))  # lr 0 at step 0
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[2])
  ref, model = twins()
  batches = mlp_batches()
  o_ref, s_ref = setup(ref)
  o, s = setup(model)
  assert_close(loop(model, o, batches, 7, sched=s), loop(ref, o_ref, batches, 7, sched=s_ref),
               LOSS_TOL, "losses")
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "params")

  ref2, model2 = twins()
  o_ref = torch.optim.SGD(ref2.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
  o = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
  s_ref = torch.optim.lr_scheduler.StepLR(o_ref, step_size=2, gamma=0.3)
  s = torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3)
  assert_close(loop(model2, o, batches, 5, sched=s), loop(ref2, o_ref, batches, 5, sched=s_ref),
               LOSS_TOL, "SGD losses")
  assert_close(params_of(model2), params_of(ref2), PARAM_TOL, "SGD params")


def test_model_wrappers_and_hf_schedulers():
  """DataParallel / torch.compile wrappers train the module they wrap; transformers' warm-up
  schedules (linear, cosine, constant) are followed; against plain torch, unwrapped."""
  from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                            get_linear_schedule_with_warmup)
  batches = mlp_batches()
  cases = ((get_linear_schedule_with_warmup, torch.nn.DataParallel, {"num_training_steps": 6}),
           (get_cosine_schedule_with_warmup, torch.compile, {"num_training_steps": 6}),
           (get_constant_schedule_with_warmup, lambda m: m, {}))

  def run(m, wrap, make_sched, kwargs):
    opt = adamw(m)
    return loop(wrap(m), opt, batches, 5, sched=make_sched(opt, num_warmup_steps=2, **kwargs))
  for make_sched, wrap, kwargs in cases:
    ref, model = twins()
    want = run(ref, lambda m: m, make_sched, kwargs)
    with enabled(distribute_parameter=False, pipeline_parallel=False):
      got = run(model, wrap, make_sched, kwargs)
      assert intercept.session_of(model) is not None  # the wrapped module is the one taken over
    assert_close(got, want, LOSS_TOL, f"{make_sched.__name__} losses")
    assert_close(params_of(model), params_of(ref), PARAM_TOL, f"{make_sched.__name__} params")


# -- the torch side: state_dict, direct reads, in-place edits ---------------------------------

def test_state_dict_save_and_direct_reads(ap, tmp_path):
  ref, model = twins()
  batches = mlp_batches()
  loop(ref, adamw(ref), batches, 3)
  loop(model, adamw(model), batches, 3)
  path = tmp_path / "model.pt"
  torch.save(model.state_dict(), path)
  fresh = regressor(seed=1)
  fresh.load_state_dict(torch.load(path))
  assert_close(params_of(fresh), params_of(ref), PARAM_TOL, "saved state_dict")
  w = model.layers[0].weight
  assert_close(w.detach(), ref.layers[0].weight.detach(), PARAM_TOL, "direct read")
  assert float(w.norm()) == pytest.approx(float(ref.layers[0].weight.norm()), abs=1e-4)
  clone = copy.deepcopy(model)
  assert type(clone.layers[0].weight) is torch.nn.Parameter
  assert_close(params_of(clone), params_of(ref), PARAM_TOL, "deepcopy")
  assert torch_frontend.sync_to_torch(model)
  assert not torch_frontend.sync_to_torch(fresh)


def test_inplace_edits_are_read_back(ap):
  ref, model = twins()
  batches = mlp_batches()

  def run(m):
    opt = adamw(m)
    losses = loop(m, opt, batches, 2)
    with torch.no_grad():
      m.layers[0].weight.mul_(0.5)  # an edit of the parameter itself
      m.layers[2].bias.data.fill_(0.25)  # through .data
    losses += loop(m, opt, batches, 2)
    m.load_state_dict(params_of(regressor(seed=5)))
    return losses + loop(m, opt, batches, 2)
  assert_close(run(model), run(ref), LOSS_TOL, "losses")
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "params")


def test_optimizer_checkpoints_save_and_resume(ap, tmp_path):
  def grouped(m):
    return torch.optim.AdamW([{"params": [p for n, p in m.named_parameters() if "weight" in n]},
                              {"params": [p for n, p in m.named_parameters() if "bias" in n],
                               "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1)
  ref, model = twins()
  batches = mlp_batches()
  opt_ref, opt = grouped(ref), grouped(model)
  loop(ref, opt_ref, batches, 2)
  loop(model, opt, batches, 2)
  torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
  saved, expected = torch.load(tmp_path / "ckpt.pt"), opt_ref.state_dict()
  assert saved["optim"]["param_groups"] == expected["param_groups"]
  for i, entry in expected["state"].items():
    assert_close({k: v for k, v in saved["optim"]["state"][i].items()}, entry, PARAM_TOL, f"state[{i}]")

  def resumed(m, o):
    ckpt = torch.load(tmp_path / "ckpt.pt")  # torch's load_state_dict aliases the tensors it gets
    m.load_state_dict(ckpt["model"])
    o.load_state_dict(ckpt["optim"])
    return loop(m, o, batches, 2), params_of(m)
  fresh = regressor(seed=7)
  plain = regressor(seed=8)
  with torch_frontend_off():
    want_losses, want = resumed(plain, grouped(plain))  # plain torch from the checkpoint
  for m, o in ((fresh, grouped(fresh)),  # state loaded before the takeover (a resumed run)
               (model, opt)):  # state loaded into a running model
    losses, got = resumed(m, o)
    assert_close(losses, want_losses, LOSS_TOL, "resumed losses")
    assert_close(got, want, PARAM_TOL, "resumed params")


@contextlib.contextmanager
def torch_frontend_off():
  """Plain torch for the models created inside (the patch stays installed)."""
  ap_xla.disable_advanced_parallelization()
  try:
    yield
  finally:
    ap_xla.enable_advanced_parallelization(mixed_precision=False, distribute_parameter=False,
                                           pipeline_parallel=False)


def test_release_gives_the_model_back(ap):
  ref, model = twins()
  batches = mlp_batches()
  opt_ref, opt = adamw(ref), adamw(model)
  loop(ref, opt_ref, batches, 2)
  loop(model, opt, batches, 2)
  assert torch_frontend.release(model)
  assert all(type(p) is torch.nn.Parameter for p in model.parameters())
  assert "step" not in opt.__dict__
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "released params")


def test_checkpoint_resumes_with_the_same_losses(ap, tmp_path):
  """save_checkpoint after 2 of 4 steps; load_checkpoint into a fresh model and optimizer (and
  into the running one) trains steps 3-4 with the uninterrupted run's losses, to 1e-6 (the
  same plan and program from the same state: equal on CPU in practice)."""
  batches = mlp_batches(4)
  model = regressor()
  opt = adamw(model)
  d = tmp_path / "ckpt"
  losses = loop(model, opt, batches[:2], 2)
  at_2 = params_of(model)
  assert ap_xla.save_checkpoint(model, opt, d, data_position=2).endswith("2")
  losses += loop(model, opt, batches[2:], 2)
  at_4 = params_of(model)

  fresh = regressor(seed=3)
  fresh_opt = adamw(fresh)
  ckpt = ap_xla.load_checkpoint(fresh, fresh_opt, d)
  assert (ckpt.step, ckpt.data_position) == (2, 2) and ckpt.plan == intercept.session_of(model).phase.plan
  assert intercept.session_of(fresh) is None  # plain torch, holding the restored weights
  assert_close(params_of(fresh), at_2, 0.0, "restored torch weights")
  assert_close(loop(fresh, fresh_opt, batches[ckpt.data_position:], 2), losses[2:], 1e-6, "resumed losses")
  assert_close(params_of(fresh), at_4, 1e-6, "resumed params")
  assert intercept.session_of(fresh).steps == 4

  assert ap_xla.load_checkpoint(model, opt, d, step=2).step == 2  # into the running session
  assert_close(params_of(model), at_2, 0.0, "restored in place")
  assert_close(loop(model, opt, batches[2:], 2), losses[2:], 1e-6, "resumed in place")

  with pytest.raises(ValueError, match=r"param_groups\[0\]\['weight_decay'\] = 0.1"):
    other = regressor()
    ap_xla.load_checkpoint(other, torch.optim.AdamW(other.parameters(), lr=1e-2), d)  # decay 0.01
  with pytest.raises(ValueError, match="not trained by ap-xla"):
    ap_xla.save_checkpoint(regressor(), opt, d)


# -- what ap-xla cannot honour raises ---------------------------------------------------------

def _trained(steps=1):
  model = regressor()
  opt = adamw(model)
  batches = mlp_batches()
  loop(model, opt, batches, steps)
  return model, opt, batches


def test_grad_is_a_read_only_view(ap):
  """`p.grad` reads the accumulated gradient (as torch's); writing through it is refused (clipping
  has its own compiled path: test_torch_clipping.py)."""
  ref, model = twins()
  batches = mlp_batches()
  opts = adamw(ref), adamw(model)
  for m, o in ((ref, opts[0]), (model, opts[1])):
    loop(m, o, batches, 1)
    m(**batches[0])[0].backward()
  w, w_ref = model.layers[0].weight, ref.layers[0].weight
  assert w.grad is not None and w.grad.shape == w_ref.grad.shape and w.grad.dtype == w_ref.grad.dtype
  assert_close(w.grad.detach(), w_ref.grad, 1e-6, "p.grad")
  assert float(w.grad.norm()) == pytest.approx(float(w_ref.grad.norm()), rel=1e-5)
  with pytest.raises(UnsupportedUsageError, match=r"layers\.0\.weight\.grad is a read-only view"):
    w.grad.mul_(0.5)
  with pytest.raises(UnsupportedUsageError, match=r"setting `layers\.0\.weight\.grad`"):
    w.grad = torch.zeros_like(w_ref)
  opts[1].zero_grad()
  assert w.grad is None


def test_optimizer_problems_raise_at_takeover(ap):
  batches = mlp_batches()
  model = regressor()
  with pytest.raises(UnsupportedUsageError, match="no torch.optim optimizer"):
    model(**batches[0])
  opts = [adamw(model), torch.optim.SGD(model.parameters(), lr=0.1)]
  with pytest.raises(UnsupportedUsageError, match="2 optimizers"):
    model(**batches[0])
  del opts
  opt = torch.optim.RMSprop(model.parameters(), lr=1e-2)
  with pytest.raises(UnsupportedUsageError, match="RMSprop"):
    model(**batches[0])
  del opt
  other = torch.nn.Linear(2, 2)
  opt = torch.optim.AdamW(list(model.parameters()) + list(other.parameters()))  # noqa: F841 (found by the takeover)
  with pytest.raises(UnsupportedUsageError, match="not in Regressor"):
    model(**batches[0])
  assert intercept.session_of(model) is None


def test_loss_outside_the_model_raises(ap):
  class Predictor(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin = torch.nn.Linear(16, 4)

    def forward(self, x):
      return self.lin(x)
  model = Predictor()
  opt = adamw(model)
  with pytest.raises(UnsupportedUsageError, match="does not return a loss"):
    model(mlp_batches()[0]["x"])
  del opt


def test_changes_ap_cannot_follow_raise(ap):
  model, opt, batches = _trained()
  opt.param_groups[0]["weight_decay"] = 0.5
  model(**batches[0])[0].backward()
  with pytest.raises(UnsupportedUsageError, match=r"\['weight_decay'\]: 0.1 -> 0.5"):
    opt.step()
  opt.param_groups[0]["weight_decay"] = 0.1

  model.layers[0].weight.requires_grad_(False)
  with pytest.raises(UnsupportedUsageError, match="requires_grad"):
    model(**batches[0])
  model.layers[0].weight.requires_grad_(True)

  alias = model.layers[0].weight.detach()  # shares storage and version counter
  loop(model, opt, batches, 1)  # the torch values are now older than the training state
  with torch.no_grad():
    alias.add_(1.0)
  with pytest.raises(UnsupportedUsageError, match="older than the training state"):
    model(**batches[0])


class NormedRegressor(torch.nn.Module):
  """An MLP with a frozen input layer, a BatchNorm and a constant buffer (all closed over)."""

  def __init__(self):
    super().__init__()
    self.inp, self.bn, self.out = torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)
    self.inp.weight.requires_grad_(False)
    self.register_buffer("scale", torch.ones(4))

  def forward(self, x, y):
    pred = self.out(torch.tanh(self.bn(self.inp(x)))) * self.scale
    return F.mse_loss(pred, y), pred


def normed(seed=0, bn_eval=True):
  torch.manual_seed(seed)
  model = NormedRegressor()
  if bn_eval:
    model.bn.eval()
  return model


def trainable_adamw(model):
  return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def test_buffer_updates_in_the_forward_raise(ap):
  model = normed(bn_eval=False)  # BatchNorm in training mode updates its running statistics
  opt = trainable_adamw(model)
  with pytest.raises(UnsupportedUsageError, match=r"BatchNorm1d 'bn': running_mean, running_var, "
                     r"num_batches_tracked.*silently.*model\.bn\.eval\(\).*track_running_stats=False"):
    model(**mlp_batches()[0])
  assert intercept.session_of(model) is None
  del opt


def test_changed_buffers_and_frozen_weights_are_bridged_again(ap, caplog):
  ref, model = twins(normed)
  batches = mlp_batches()

  def run(m):
    opt = trainable_adamw(m)
    losses = loop(m, opt, batches, 2)
    with torch.no_grad():
      m.inp.weight.mul_(0.5)  # a frozen weight edited in place
      m.bn.running_var.fill_(2.0)  # a buffer edited in place
    m.scale = torch.full((4,), 0.5)  # a buffer replaced
    losses += loop(m, opt, batches, 2)
    m.load_state_dict(params_of(normed(seed=5)))  # everything: trainable, frozen, buffers
    return losses + loop(m, opt, batches, 2)
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    losses = run(model)
  assert_close(losses, run(ref), LOSS_TOL, "losses")
  assert_close(params_of(model), params_of(ref), PARAM_TOL, "params")
  assert caplog.text.count("the model is bridged again with the new values") == 2
  assert caplog.text.count("ap-xla plan for NormedRegressor") == 1  # the plan is kept

  model.inp.weight.requires_grad_(True)
  with pytest.raises(UnsupportedUsageError, match=r"requires_grad of \['inp.weight'\] changed to True"):
    model(**batches[0])


def test_schedulers_that_cycle_momentum_raise(ap):
  batches = mlp_batches()
  model = regressor()
  opt = adamw(model)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
  with pytest.raises(UnsupportedUsageError, match=r"OneCycleLR\(cycle_momentum=True\) changes "
                     r"betas\[0\] of AdamW.*cycle_momentum=False"):
    model(**batches[0])
  del sched, opt

  model = regressor()
  opt = adamw(model)
  model(**batches[0])[0].backward()  # taken over; the scheduler comes after
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
  with pytest.raises(UnsupportedUsageError, match=r"\['betas'\].*cycle momentum or betas"):
    opt.step()
  del sched


def test_gradients_outside_the_model_raise(ap):
  model, opt, batches = _trained()
  loss = model(**batches[0])[0] + 1e-3 * sum(p.pow(2).sum() for p in model.parameters())
  loss.backward()
  with pytest.raises(UnsupportedUsageError, match="outside the model's forward"):
    opt.step()
  opt.zero_grad()
  for p in model.parameters():  # clear what torch autograd wrote
    torch._C.TensorBase.grad.__set__(p, None)

  out = model(**batches[0])
  with pytest.raises(UnsupportedUsageError, match="depends on the model output"):
    (out[0] + out[1].sum()).backward()


def test_outputs_after_step_raise(ap):
  model, opt, batches = _trained()
  out = model(**batches[0])
  out[0].backward()
  opt.step()
  with pytest.raises(UnsupportedUsageError, match="before optimizer.step"):
    out[1]


def test_enable_installs_the_patch_and_ap_xla_exports_sync():
  """The contract's entry points (wired in ap_xla/config.py and ap_xla/__init__.py)."""
  assert not intercept.is_installed()
  ap_xla.enable_advanced_parallelization(mixed_precision=False)
  try:
    assert intercept.is_installed()
    assert ap_xla.sync_to_torch is torch_frontend.sync_to_torch
  finally:
    ap_xla.disable_advanced_parallelization()
  assert not intercept.is_installed()
