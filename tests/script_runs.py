"""Running a training script in-process: as plain torch (the reference) or as `ap-xla run` does.

The reference runs the script with torch's own numerics on the host. A script written for
MoAI calls `.cuda()`, which a CPU build of torch refuses, so the reference runs under the
device presentation alone (`ap_xla.torch_frontend.devices`: moves are host identities),
with no model taken over. `ap_run` calls `ap_xla.launcher.main`, what `ap-xla run` calls.
Both return the script's stdout; its last line is the JSON the test scripts print.
"""
import contextlib
import io
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "torch_scripts")


def script(name: str) -> str:
  return os.path.join(SCRIPTS, name)


@contextlib.contextmanager
def host_accelerator():
  """Plain torch with "cuda" moves as host identities (no takeover)."""
  from ap_xla.torch_frontend import devices
  from ap_xla.torch_frontend.patching import Patches
  patches = Patches()
  devices.install(patches)
  try:
    yield
  finally:
    devices.uninstall()
    patches.undo()


def _reset_accelerate():
  """A fresh process would start without accelerate's singletons; so does each run here."""
  try:
    from accelerate.state import AcceleratorState, GradientState
  except ImportError:
    return
  AcceleratorState._reset_state(reset_partial_state=True)
  GradientState._reset_state()


def reference(path: str, args) -> str:
  """The script's stdout, run as plain torch."""
  _reset_accelerate()
  out, saved = io.StringIO(), sys.argv
  sys.argv = [path, *args]
  try:
    with host_accelerator(), contextlib.redirect_stdout(out):
      runpy.run_path(path, run_name="__main__")
  finally:
    sys.argv = saved
  return out.getvalue()


def ap_run(path: str, args) -> str:
  """The script's stdout, run by `ap-xla run` in this process."""
  from ap_xla import launcher
  _reset_accelerate()
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = launcher.main([path, *args])
  assert code == 0, f"{os.path.basename(path)} exited with {code}:\n{out.getvalue()[-3000:]}"
  return out.getvalue()


def last_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])
