"""Installs and uninstalls the torch front end: every patch it makes, in one place.

`install()` (called by `enable_advanced_parallelization()` and by `ap-xla run`) makes these,
all recorded in `PATCHES` and undone by `uninstall()`:

  * `torch.nn.Module.__call__`: the model takeover (`intercept.py`);
  * the device presentation (`devices.py`): `AcceleratorMode` pushed on the torch-function
    stack; the `torch.cuda` functions of `devices.CUDA_FUNCTIONS` (also in
    `torch.cuda.memory` / `torch.cuda.random` where they are defined); `GradScaler.__init__`
    (a "cuda" scaler is made disabled); `_BaseDataLoaderIter.__init__` (no pinning);
  * `torch.nn.utils.clip_grad_norm_`, `clip_grad_value_`, `clip_grads_with_norm_` (also in
    `torch.nn.utils.clip_grad`): clipping compiled into the update (`clipping.py`).

What a takeover changes on the user's objects is undone by `release()` of each model (also
run by `uninstall()`): the parameters' class (`sync.APParam`), a state-dict pre-hook on each
submodule, and on the optimizer instance its `step` / `zero_grad` and two state-dict hooks
(`optimizer.py`). Finding the optimizer and checking its schedulers reads
`gc.get_objects()` (`adapters.py`); `torch.nn.Module.zero_grad()` is recognised by its frame
when it reads `p.grad` (`sync.TorchMirror.handle_module_zero_grad`), and honoured as clearing
the accumulator.
"""
from __future__ import annotations

import threading

from ap_xla.torch_frontend import clipping, devices, intercept
from ap_xla.torch_frontend.patching import Patches

PATCHES = Patches()
_lock = threading.Lock()


def install(default_plan: bool = False) -> None:
  """Makes every patch (idempotent); `default_plan` also takes models over without AP (`ap-xla run`)."""
  with _lock:
    if not intercept.is_installed():
      devices.install(PATCHES)
      clipping.install(PATCHES)
    intercept.install(PATCHES, default_plan)


def uninstall() -> None:
  """Gives every taken-over model back to torch and undoes every patch."""
  with _lock:
    intercept.release_all()
    devices.uninstall()
    PATCHES.undo()


def is_installed() -> bool:
  return intercept.is_installed()
