"""Hugging Face causal-LM architectures trained through ap-xla, against plain torch.

Each architecture of `bridge.testing.TESTED_CAUSAL_LMS` (a tiny config, transformers' default
attention; benchmarks/architectures.py runs the same check over all of `CAUSAL_LMS`) is fine-tuned for 5 AdamW steps by one unchanged torch script
(tests/torch_scripts/train_causal_lm.py), run in this process twice: as plain torch, and as
`ap-xla run` runs it (`launcher.main`), which takes the model over at its first training call
with MoAI's default plan: data parallelism over the 8 simulated devices. That plan is pinned,
not searched, so a case costs one bridge, one candidate compile and the steps; the plan
search over these models is the one-liner's business (tests/test_torch_oneliner.py).

Tolerances (fp32, matmul precision 'highest'): losses within 1e-4 relative; the state_dict
after the 5 steps within 1e-4 absolute, a tenth of the learning rate (AdamW divides by
sqrt(v): on an entry whose gradient is ~1e-8, a 1e-9 difference in summation order moves
its update by ~10% of lr; the largest such difference measured, Falcon's, was 6.3e-5).
"""
import contextlib
import io
import json
import logging
import os
import runpy
import sys

import numpy as np
import pytest
import torch

import ap_xla
from ap_xla import launcher
from bridge import testing
from tests.torch_models import Pooler

LOSS_RTOL, PARAM_TOL = 1e-4, 1e-4
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_scripts", "train_causal_lm.py")


def run_script(args, through_ap_xla: bool) -> tuple[list, dict]:
  """Runs SCRIPT in this process (plain, or as `ap-xla run` does); returns (losses, state_dict)."""
  out = io.StringIO()
  saved = sys.argv
  with contextlib.redirect_stdout(out):
    if through_ap_xla:
      assert launcher.main([SCRIPT, *args]) == 0
    else:
      sys.argv = [SCRIPT, *args]
      try:
        runpy.run_path(SCRIPT, run_name="__main__")
      finally:
        sys.argv = saved
  line = out.getvalue().strip().splitlines()[-1]
  return json.loads(line)["losses"], torch.load(args[args.index("--out") + 1])


# In the default run, four architectures with the quirks the bridge must get right (Llama's GQA
# and rotary, GPT-2's Conv1D and tied embeddings, Mixtral's experts, Gemma 2's soft-capping and
# flat program); BLOOM (ALiBi) and the others run with `-m slow` (scripts/bench.sh slow_tests),
# and all 22 in benchmarks/architectures.py.
REPEATS = ("mistral", "qwen2", "qwen3", "gemma", "bloom", "phi", "phi3", "falcon", "starcoder2")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in REPEATS else a
                                  for a in testing.TESTED_CAUSAL_LMS])
def test_architecture_trains_like_torch(arch, tmp_path, caplog):
  ref_losses, want = run_script(["--arch", arch, "--out", str(tmp_path / "torch.pt")], False)
  with caplog.at_level(logging.INFO):
    losses, trained = run_script(["--arch", arch, "--out", str(tmp_path / "ap.pt")], True)
  assert "Plan(dp=8, tp=1, pp=1, mb=1, recompute='none', fsdp=False)" in caplog.text
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, atol=0)
  assert trained.keys() == want.keys()
  errors = {k: float((trained[k] - want[k]).abs().max()) for k in want}
  worst = max(errors, key=errors.get)
  assert errors[worst] <= PARAM_TOL, (worst, errors[worst])
  assert ("run as fused attention" in caplog.text) == (arch not in testing.EAGER_ONLY)
  container = testing.CAUSAL_LMS[arch]
  if container is None:  # layers that differ (alternating attention windows): one flat program
    assert "no block stack: flat program" in caplog.text
  else:
    assert f"block stack '{container}': 2 x " in caplog.text


class PooledRegressor(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Linear(4, 4)
    self.pool = Pooler()

  def forward(self, x, y):
    return torch.nn.functional.mse_loss(self.pool(self.proj(x)), y)


def test_an_operator_without_lowering_is_an_unsupported_usage_error():
  model = PooledRegressor()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  x, y = torch.randn(8, 3, 4), torch.randn(8, 4)
  ap_xla.enable_advanced_parallelization(mixed_precision=False)  # the one-liner
  try:
    with pytest.raises(ap_xla.UnsupportedUsageError) as info:
      model(x=x, y=y).backward()
    assert opt.state == {}  # nothing was trained
  finally:
    ap_xla.disable_advanced_parallelization()
  msg = str(info.value)
  assert "ap-xla cannot train PooledRegressor" in msg
  assert "aten::segment_reduce" in msg and "module 'pool'" in msg  # the operator and its module
  assert "torch.segment_reduce(" in msg  # the source line
  assert "EXTRA_LOWERINGS" in msg and "without enable_advanced_parallelization()" in msg  # what to do
