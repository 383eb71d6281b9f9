"""The accelerator as MoAI presents it (ap_xla/torch_frontend/devices.py), on this CPU build.

What `torch.cuda` answers, that moves are host identities, the disabled GradScaler, no
pinning, everything undone by `uninstall()`; then a training loop under
`torch.autocast("cuda", dtype=torch.bfloat16)` with a GradScaler, planned in bf16, against
torch's own bf16 autocast on the CPU (tolerance 3e-2 relative: the plan computes in bf16
throughout, torch's autocast only its matmuls), and the memory figures against the plan's.
"""
import dataclasses

import jax
import numpy as np
import pytest
import torch

import ap_xla
from ap_xla import config, torch_frontend
from ap_xla.torch_frontend import device_memory, installer, intercept, registry
from bridge import testing


def _state():
  """What install() changes, as plain values."""
  import torch.cuda.memory
  from torch.amp import grad_scaler
  return dict(available=torch.cuda.is_available(), call=torch.nn.Module.__call__,
              clip=torch.nn.utils.clip_grad_norm_, clip_value=torch.nn.utils.clip_grad_value_,
              scaler=grad_scaler.GradScaler.__init__, mem=torch.cuda.memory.memory_allocated,
              count=torch.cuda.device_count, modes=torch._C._len_torch_function_stack())


def test_cuda_as_presented_and_undone():
  before = _state()
  torch_frontend.install(default_plan=True)
  try:
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
    assert torch.cuda.get_device_name() == "ap-xla (8 x cpu)" == torch.cuda.get_device_name(0)
    assert torch.cuda.get_device_capability() == (8, 0) and torch.cuda.is_bf16_supported()
    props = torch.cuda.get_device_properties(0)
    assert props.total_memory == device_memory.capacity() > 0 and props.name == torch.cuda.get_device_name()
    free, total = torch.cuda.mem_get_info()
    assert total == props.total_memory and 0 <= free <= total
    torch.cuda.set_device(0)
    torch.cuda.set_device("cuda:0")
    with pytest.raises(ValueError, match="presents one accelerator"):
      torch.cuda.set_device(1)
    for fn in (torch.cuda.synchronize, torch.cuda.empty_cache, lambda: torch.cuda.manual_seed_all(0),
               lambda: torch.cuda.manual_seed(0), torch.cuda.reset_peak_memory_stats):
      assert fn() is None
    assert torch.cuda.get_rng_state_all() == [] and torch.cuda.random.get_rng_state_all() == []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(end) >= 0.0
    with torch.cuda.device(0):
      pass

    # Moves to the accelerator are host identities; factories on it make host tensors.
    x = torch.randn(3)
    assert x.cuda() is x and x.to("cuda") is x and x.to(torch.device("cuda", 0)) is x and x.to(0) is x
    assert x.to("cuda", torch.float64).dtype == torch.float64 and x.pin_memory() is x
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert x.new_ones(2, device="cuda:0").device.type == "cpu"
    with torch.device("cuda"):
      assert torch.ones(1).device.type == "cpu"
    lin = torch.nn.Linear(2, 2).cuda()
    lin.to(torch.device("cuda:0"))
    assert next(lin.parameters()).device.type == "cpu" and not next(lin.parameters()).is_cuda
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert torch.arange(3, device=device).device.type == "cpu"

    # The scaler of the accelerator is a disabled one that still steps; no pinning.
    for scaler in (torch.amp.GradScaler("cuda"), torch.amp.GradScaler()):
      loss = torch.tensor(2.0)
      assert not scaler.is_enabled() and scaler.scale(loss) is loss and scaler.get_scale() == 1.0
    assert torch.amp.GradScaler("cpu").is_enabled()  # the host's own scaler is left alone
    loader = torch.utils.data.DataLoader([torch.ones(2)] * 4, batch_size=2, pin_memory=True)
    assert not any(b.is_pinned() for b in loader)
    assert len(installer.PATCHES) > 40
  finally:
    torch_frontend.uninstall()
  assert _state() == before
  assert not intercept.is_installed() and not torch.cuda.is_available()


def _autocast_loop(model, batches, device_type):
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  scaler = torch.amp.GradScaler(device_type, enabled=device_type == "cuda")
  losses = []
  for batch in batches:
    with torch.autocast(device_type, dtype=torch.bfloat16):
      loss = model(**batch).loss
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    losses.append(loss.item())
  return losses


def test_autocast_is_the_plans_bf16_and_memory_is_the_plans():
  batches = [testing.lm_batch(8, 16, seed=s) for s in range(5)]
  for b in batches:
    b.pop("use_cache")
  ref = testing.tiny_causal_lm("llama")
  model = testing.tiny_causal_lm("llama")
  model.load_state_dict(ref.state_dict())
  want = _autocast_loop(ref, batches, "cpu")  # torch's own bf16 autocast on the host
  ap_xla.enable_advanced_parallelization(mixed_precision=False, pipeline_parallel=False, num_stages=1,
                                         num_micro_batches=1, activation_recomputation=False,
                                         distribute_parameter=False)
  config.set_options(dataclasses.replace(config.current_options(), tensor_parallel=1))
  try:
    model.cuda()
    got = _autocast_loop(model, [{k: v.cuda() for k, v in b.items()} for b in batches], "cuda")
    session = registry.session_of(model)
    assert session.phase.plan.bf16  # the options said fp32: autocast asked for bf16
    np.testing.assert_allclose(got, want, rtol=3e-2)

    peak = ap_xla.plan_report(model).chosen.memory_bytes
    now = torch.cuda.memory_allocated()
    shards = sum(s.data.nbytes for leaf in jax.tree.leaves((session.params, session.opt_state))
                 for s in leaf.addressable_shards if s.device == session.phase.devices[0])
    assert now == shards > 0  # the training state held on one device
    assert torch.cuda.max_memory_allocated() == max(peak, now)
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.max_memory_allocated() == now  # no step since the reset
    with torch.autocast("cuda", dtype=torch.bfloat16):
      model(**batches[0]).loss.backward()
    assert torch.cuda.max_memory_allocated() == max(peak, torch.cuda.memory_allocated())
    assert torch.cuda.memory_stats()["allocated_bytes.all.peak"] == torch.cuda.max_memory_allocated()
  finally:
    ap_xla.disable_advanced_parallelization()
