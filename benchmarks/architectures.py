"""Every Hugging Face causal LM of `bridge.testing.CAUSAL_LMS` trained through ap-xla vs torch.

For each architecture (a tiny config, transformers' default attention) the unchanged torch
script tests/torch_scripts/train_causal_lm.py (5 AdamW steps on left-padded batches) runs in
this process twice: as plain torch, and as `ap-xla run` runs it (MoAI's default plan, data
parallelism over the simulated devices). Reported per architecture: the largest relative loss
difference over the steps, the largest absolute difference of the trained state_dict, the
block stack the bridge found (or 'flat'), whether attention ran fused (sdpa kept whole), and
the wall time of the ap-xla run (bridge, one compile, 5 steps; noisy on a shared machine).
tests/test_torch_architectures.py checks `TESTED_CAUSAL_LMS` the same way on every test run.

Prints a table, then as the last line one JSON object with the figures.

Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/architectures.py [ARCH ...]
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import runpy
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AP_XLA_PLAN_CACHE", "0")

import jax  # noqa: E402
import torch  # noqa: E402

from ap_xla import launcher  # noqa: E402
from bridge import testing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "torch_scripts", "train_causal_lm.py")


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def run(arch: str, out: str, through_ap_xla: bool) -> list[float]:
  """Runs the script for `arch` in this process; returns its losses (state_dict saved to `out`)."""
  args = ["--arch", arch, "--out", out]
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    if through_ap_xla:
      code = launcher.main([SCRIPT, *args])
      if code:
        raise RuntimeError(f"ap-xla run exited with {code}")
    else:
      saved, sys.argv = sys.argv, [SCRIPT, *args]
      try:
        runpy.run_path(SCRIPT, run_name="__main__")
      finally:
        sys.argv = saved
  return json.loads(buffer.getvalue().strip().splitlines()[-1])["losses"]


def check(arch: str, folder: str) -> dict:
  ref = run(arch, os.path.join(folder, f"{arch}-torch.pt"), False)
  handler = _Lines()
  logging.getLogger().addHandler(handler)
  level = logging.getLogger().level
  logging.getLogger().setLevel(logging.INFO)
  start = time.perf_counter()
  try:
    losses = run(arch, os.path.join(folder, f"{arch}-ap.pt"), True)
  finally:
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)
  seconds = time.perf_counter() - start
  want = torch.load(os.path.join(folder, f"{arch}-torch.pt"))
  got = torch.load(os.path.join(folder, f"{arch}-ap.pt"))
  text = "\n".join(handler.lines)
  stack = re.search(r"block stack '([^']+)': (\d+) x (\w+)", text)
  return {
      "arch": arch,
      "loss_rel_err": max(abs(a - b) / abs(b) for a, b in zip(losses, ref)),
      "param_abs_err": max(float((got[k] - want[k]).abs().max()) for k in want),
      "blocks": f"{stack.group(1)} ({stack.group(2)} x {stack.group(3)})" if stack else "flat",
      "fused_attention": "run as fused attention" in text,
      "seconds": round(seconds, 1),
      "tested": arch in testing.TESTED_CAUSAL_LMS,
  }


def main(argv: list[str]) -> None:
  archs = argv or list(testing.CAUSAL_LMS)
  unknown = sorted(set(archs) - set(testing.CAUSAL_LMS))
  if unknown:
    raise SystemExit(f"unknown architectures {unknown}; known: {sorted(testing.CAUSAL_LMS)}")
  jax.config.update("jax_default_matmul_precision", "highest")
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    for arch in archs:
      try:
        rows.append(check(arch, folder))
      except Exception as e:  # a failing architecture is a row with its reason
        rows.append({"arch": arch, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
  print(f"{len(jax.devices())} devices; losses over 5 AdamW steps, fp32")
  print(f"{'architecture':12} {'loss rel err':>12} {'param err':>10} {'fused attn':>10} {'s':>6}  "
        f"{'tests':5}  blocks")
  for r in rows:
    if "error" in r:
      print(f"{r['arch']:12} FAILED: {r['error']}")
      continue
    print(f"{r['arch']:12} {r['loss_rel_err']:>12.2e} {r['param_abs_err']:>10.2e} "
          f"{'yes' if r['fused_attention'] else 'no':>10} {r['seconds']:>6.1f}  "
          f"{'yes' if r['tested'] else 'no':5}  {r['blocks']}")
  ok = [r for r in rows if "error" not in r and r["loss_rel_err"] <= 1e-4]
  print(json.dumps({"architectures": len(rows), "matching_1e-4": len(ok),
                    "worst_loss_rel_err": max((r["loss_rel_err"] for r in rows if "error" not in r), default=None),
                    "failed": [r["arch"] for r in rows if "error" in r], "rows": rows}))


if __name__ == "__main__":
  main(sys.argv[1:])
