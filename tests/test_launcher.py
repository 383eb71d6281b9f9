"""`ap-xla run`: scripts written for MoAI run unmodified, with and without the AP line.

The script (tests/torch_scripts/moai_regressor.py) is plain torch; run directly it is the
reference. Through `python -m ap_xla run` it runs in a subprocess on 8 simulated devices:
with its AP line (the plan search), without it (plain data parallelism), and without it on
devices too small for it (the out-of-memory error). Losses agree with torch to 1e-5.
"""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from ap_xla import launcher
from ap_xla.torch_frontend import intercept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join("tests", "torch_scripts")
REGRESSOR = os.path.join(SCRIPTS, "moai_regressor.py")
STEPS = ["--steps", "3"]


def _start(args, **env):
  environ = dict(os.environ, AP_XLA_PLAN_CACHE="0", **env)
  return subprocess.Popen([sys.executable, "-m", "ap_xla", "run", *args], cwd=ROOT, env=environ,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs():
  """The three launches, started together (each is mostly process start-up and one compile)."""
  procs = {
      "ap": _start([REGRESSOR, *STEPS, "--ap"]),
      "plain": _start([REGRESSOR, *STEPS]),
      "oom": _start([REGRESSOR, *STEPS], AP_XLA_DEVICE_MEMORY="16KiB"),
  }
  out = {}
  for name, p in procs.items():
    stdout, stderr = p.communicate(timeout=600)
    out[name] = (p.returncode, stdout, stderr)
  return out


def _reference() -> dict:
  """The script run as plain torch, in this process (the patch is not installed)."""
  assert not intercept.is_installed()
  buf, saved = io.StringIO(), sys.argv
  sys.argv = [REGRESSOR, *STEPS]
  try:
    with contextlib.redirect_stdout(buf):
      runpy.run_path(os.path.join(ROOT, REGRESSOR), run_name="__main__")
  finally:
    sys.argv = saved
  return json.loads(buf.getvalue().strip().splitlines()[-1])


def _result(run) -> dict:
  rc, stdout, stderr = run
  assert rc == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


def test_script_with_the_ap_line_matches_plain_torch(runs):
  ref, got = _reference(), _result(runs["ap"])
  assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5)
  assert got["weights"] == pytest.approx(ref["weights"], abs=1e-4)
  stderr = runs["ap"][2]
  assert "The final configuration is" in stderr and "ap-xla plan for Regressor" in stderr


def test_script_without_the_ap_line_runs_plain_data_parallel(runs):
  ref, got = _reference(), _result(runs["plain"])
  assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5)
  assert got["weights"] == pytest.approx(ref["weights"], abs=1e-4)
  stderr = runs["plain"][2]
  assert "Advanced Parallelization is off" in stderr
  assert "Plan(dp=8, tp=1, pp=1, mb=1, recompute='none', fsdp=False)" in stderr


def test_script_without_the_ap_line_fails_with_out_of_memory(runs):
  rc, _, stderr = runs["oom"]
  assert rc != 0
  assert "OUT_OF_MEMORY" in stderr
  message = stderr[stderr.index("OUT_OF_MEMORY"):]
  assert "per device; available:" in message  # memory requested and available per device
  # The three remedies a script without the AP line can act on ...
  assert "enable Advanced Parallelization" in message and "enable_advanced_parallelization()" in message
  assert "more devices (now 8)" in message and "smaller global batch (now 16)" in message
  # ... and not the search options it never set.
  assert "un-pin" not in message and "num_stages" not in message


def test_launcher_gives_argv_main_and_torch_moreh(capsys):
  script = os.path.join(ROOT, SCRIPTS, "moai_exit.py")
  assert launcher.main([script, "7"]) == 7
  assert "argv ['7']" in capsys.readouterr().out
  assert launcher.main([script]) == 0
  # Everything is undone afterwards.
  assert not hasattr(torch, "moreh") and "torch.moreh" not in sys.modules
  assert not intercept.is_installed()


def test_launcher_usage_errors(capsys):
  assert launcher.main([]) == 2
  assert launcher.main(["no/such/script.py"]) == 2
  assert "no such script" in capsys.readouterr().err
  launcher.install_moreh()
  try:
    with pytest.raises(AttributeError, match="MoAI API that ap-xla does not provide"):
      torch.moreh.option.set_backend  # noqa: B018
  finally:
    launcher.uninstall_moreh()
