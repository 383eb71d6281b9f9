"""Gradient clipping in a plain torch loop, compiled into the update, against plain torch.

A tiny GPT-2 (its token embedding and LM head are one tied tensor, kept before and after the
block stack) trained on a pinned plan that shards the gradients: data parallel over 8 devices
with FSDP (ZeRO-3), so every norm is a reduction over all devices' shards. Each step clips
another way: the global 2-norm, the inf-norm, `clip_grad_value_`, a norm over one block's
parameters only (then the whole model's), and clipping after two accumulated backwards.
Tolerances (fp32): returned norms 1e-5 relative, losses 1e-5 and parameters 5e-5 absolute
(see test_torch_oneliner.py).
"""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import ap_xla
from ap_xla import config
from ap_xla.torch_frontend import registry
from bridge import testing

NORM_REL, LOSS_TOL, PARAM_TOL = 1e-5, 1e-5, 5e-5


def enable_pinned():
  """AP with every dimension pinned: Plan(dp=8, fsdp=True), one compile."""
  ap_xla.enable_advanced_parallelization(mixed_precision=False, pipeline_parallel=False, num_stages=1,
                                         num_micro_batches=1, activation_recomputation=False,
                                         distribute_parameter=True)
  config.set_options(dataclasses.replace(config.current_options(), tensor_parallel=1,
                                         distribute_low_prec_param=False))


def clip_loop(model, batches):
  """Five steps, each clipping differently; returns (losses, every value a clip call returned)."""
  params = list(model.parameters())
  opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
  clip = torch.nn.utils
  losses, norms = [], []
  for step in range(5):
    out = model(**batches[step % len(batches)])
    out.loss.backward()
    losses.append(out.loss.item())
    if step == 0:
      norms.append(clip.clip_grad_norm_(model.parameters(), 0.5).item())
    elif step == 1:
      norms.append(clip.clip_grad_norm_(params, 0.05, norm_type=math.inf).item())
    elif step == 2:
      clip.clip_grad_value_(params, 2e-3)
      norms.append(float(clip.get_total_norm([p.grad for p in params if p.grad is not None])))
    elif step == 3:
      norms.append(clip.clip_grad_norm_(model.transformer.h[0].parameters(), 0.05).item())
      norms.append(clip.clip_grad_norm_(params, 0.3, norm_type=3.0).item())
    else:
      model(**batches[0]).loss.backward()  # a second backward: the clip sees the sum
      norms.append(float(clip.clip_grad_norm_(params, 0.5)))
    opt.step()
    opt.zero_grad()
  return losses, norms


def test_clipping_matches_torch():
  ref = testing.tiny_causal_lm("gpt2")
  model = copy.deepcopy(ref)
  batches = [testing.lm_batch(8, 16, seed=s) for s in range(3)]
  for b in batches:
    b.pop("use_cache")
  want_losses, want_norms = clip_loop(ref, batches)
  enable_pinned()
  try:
    losses, norms = clip_loop(model, batches)
    session = registry.session_of(model)
    assert (session.phase.plan.dp, session.phase.plan.fsdp) == (8, True)
    assert session.grads.index.tied  # the tied embedding / LM head is in two leaves
    np.testing.assert_allclose(norms, want_norms, rtol=NORM_REL)
    np.testing.assert_allclose(losses, want_losses, atol=LOSS_TOL)
    for (k, v), (_, w) in zip(model.state_dict().items(), ref.state_dict().items()):
      err = float((v.double() - w.double()).abs().max())
      assert err <= PARAM_TOL, f"{k}: {err:.3g}"

    # What a clip returns, and the errors torch raises.
    model(**batches[0]).loss.backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert isinstance(total, torch.Tensor) and total.dtype == torch.float32 and total.item() > 0
    with pytest.raises(ValueError, match="norm_type must be a positive number or inf"):
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=-1)
    session.grads.scale_by(frozenset(session.grads.index.where), float("nan"))
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
  finally:
    ap_xla.disable_advanced_parallelization()
  assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"  # torch's own again
