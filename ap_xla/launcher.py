"""`ap-xla run script.py [args]`: runs a training script written for MoAI, unmodified.

The launcher provides MoAI's `torch.moreh.option.enable_advanced_parallelization` (a module
object in `sys.modules` as `torch.moreh` and `torch.moreh.option`, also set as the attribute
`torch.moreh`; `import moreh`, which MoAI's recipes try first, imports an empty `moreh`
module), installs the torch front end (the model takeover and the "cuda" accelerator as MoAI
presents it: `ap_xla.torch_frontend.devices`) and runs the script with `runpy` as `__main__`
with `sys.argv = [script, *args]`.

As on MoAI, a script without the AP line still runs on all devices: each model it trains
gets a plain data-parallel plan (`Plan(dp=N)`, fp32, no search beyond checking that it
fits); when it does not fit, training stops with the out-of-memory error (memory needed
and available per device, and what to do). With the AP line, the search picks the plan.

Example:
  $ ap-xla run train.py --epochs 1
  $ python -m ap_xla run train.py --epochs 1
"""
from __future__ import annotations

import logging
import os
import runpy
import sys
import types

USAGE = "usage: ap-xla run SCRIPT.py [ARGS...]"


def moreh_modules() -> tuple[types.ModuleType, types.ModuleType]:
  """`torch.moreh` and `torch.moreh.option` as module objects with MoAI's AP switches."""
  from ap_xla import api

  option = types.ModuleType("torch.moreh.option", "MoAI's options, as provided by ap-xla.")
  option.enable_advanced_parallelization = api.enable_advanced_parallelization
  option.disable_advanced_parallelization = api.disable_advanced_parallelization

  def missing(name):
    if name.startswith("__"):
      raise AttributeError(name)
    raise AttributeError(
        f"torch.moreh.option.{name} is a MoAI API that ap-xla does not provide; ap-xla provides "
        "enable_advanced_parallelization and disable_advanced_parallelization.")
  option.__getattr__ = missing

  moreh = types.ModuleType("torch.moreh", "MoAI's torch extension namespace, as provided by ap-xla.")
  moreh.option = option
  moreh.__path__ = []  # a package, so `import torch.moreh.option` resolves through sys.modules
  return moreh, option


def install_moreh() -> None:
  """Makes `import torch.moreh.option` and `torch.moreh.option.enable_advanced_parallelization` work."""
  import torch
  moreh, option = moreh_modules()
  sys.modules["torch.moreh"] = moreh
  sys.modules["torch.moreh.option"] = option
  torch.moreh = moreh
  if "moreh" not in sys.modules:
    sys.modules["moreh"] = types.ModuleType("moreh", "MoAI's driver module, as provided by ap-xla (empty).")


def uninstall_moreh() -> None:
  import torch
  sys.modules.pop("torch.moreh.option", None)
  sys.modules.pop("torch.moreh", None)
  if getattr(sys.modules.get("moreh"), "__doc__", "").endswith("as provided by ap-xla (empty)."):
    sys.modules.pop("moreh")
  if hasattr(torch, "moreh"):
    del torch.moreh


def main(argv=None) -> int:
  """Runs `SCRIPT.py ARGS...` with MoAI's API and the one-liner installed; returns the exit code.

  Args:
    argv: `[script, *args]` (default: `sys.argv[1:]`).

  Returns:
    The script's exit code (its `sys.exit` value; 0 when it ends normally). Exceptions
    raised by the script propagate with their traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE + "\n\nRuns a PyTorch training script (written for MoAI) with ap-xla: "
          "torch.moreh.option.enable_advanced_parallelization() turns on the plan search; without "
          "it, models train with plain data parallelism on all devices.",
          file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  script, args = argv[0], argv[1:]
  if not os.path.isfile(script):
    print(f"ap-xla run: no such script: {script!r}\n{USAGE}", file=sys.stderr)
    return 2

  from ap_xla import api, torch_frontend
  _show_log()
  install_moreh()
  torch_frontend.install(default_plan=True)
  saved_argv, saved_path = sys.argv, list(sys.path)
  sys.argv = [script, *args]
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  try:
    runpy.run_path(script, run_name="__main__")
  except SystemExit as e:
    return _exit_code(e.code)
  finally:
    sys.argv, sys.path[:] = saved_argv, saved_path
    torch_frontend.uninstall()
    api.disable_advanced_parallelization()
    uninstall_moreh()
  return 0


def _exit_code(code) -> int:
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)  # sys.exit("message") prints it and exits 1, as Python does
  return 1


def _show_log() -> None:
  logger = logging.getLogger("ap_xla")
  if logger.handlers or logging.getLogger().handlers:
    return
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("[ap-xla] %(message)s"))
  logger.addHandler(handler)
  if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)
