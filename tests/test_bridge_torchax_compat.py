"""The torch 2.13 shim for torchax: narrow, temporary, inert on torch 2.11/2.12, removable once
torchax is fixed."""
import subprocess
import sys

import pytest
import torch
import torch._ops

from bridge import torchax_compat


needs_shim = pytest.mark.skipif(not torchax_compat.named_overloads_removed(),
                                reason=f"torch {torch.__version__} keeps the named-tensor overloads: the shim is inert")


def test_named_overloads_removed_matches_torch():
  removed = not hasattr(torch.ops.aten.index_copy, "dimname")
  assert torchax_compat.named_overloads_removed() == removed
  if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13):
    assert not removed  # torch 2.11 / 2.12 (the GPU machine's 2.11): torchax imports as it is


@needs_shim
def test_shim_still_needed():
  """Fails on the day `import torchax` works under this torch without the shim: then delete
  bridge/torchax_compat.py (and call torchax directly)."""
  code = "import torchax; torchax.default_env()"
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  if run.returncode == 0:
    pytest.fail(f"torchax now imports under torch {torch.__version__} without bridge/torchax_compat.py; "
                "remove the shim.")
  assert "has no overload name" in run.stderr, run.stderr[-2000:]


@needs_shim
def test_placeholders_only_stand_in_for_removed_named_tensor_overloads():
  torchax = torchax_compat.torchax_module()
  assert torchax.__version__ == "0.0.13"
  used = torchax_compat.placeholders_used()
  assert "aten.prod.dim_Dimname" in used
  for name in used:
    assert torchax_compat._is_named_tensor_overload(name.rsplit(".", 1)[1]), name
  assert len(used) < 40  # ~22 under torch 2.13: a sudden jump means something else broke


def test_existing_overloads_pass_through_the_patch_untouched():
  """What torch 2.11/2.12 (and any overload torch still has) sees: the real overloads, no log."""
  log = []
  with torchax_compat._placeholders_for_removed_overloads(log):
    assert torch.ops.aten.prod.dim_int is torch._ops.ops.aten.prod.dim_int
    assert isinstance(torch.ops.aten.prod.dim_int, torch._ops.OpOverload)
    with pytest.raises(AttributeError):
      torch.ops.aten.prod.not_an_overload  # noqa: B018  (not a named-tensor name: still raises)
  assert log == []


def test_patch_is_removed_once_torchax_is_loaded():
  torchax_compat.torchax_module()
  assert torch._ops.OpOverloadPacket.__getattr__.__module__ == "torch._ops"
  if torchax_compat.named_overloads_removed():
    with pytest.raises(AttributeError):
      torch.ops.aten.prod.dim_Dimname  # noqa: B018  (really gone again outside the shim)
  with pytest.raises(RuntimeError, match="removed from torch"):
    torchax_compat.MissingOverload("aten.prod", "dim_Dimname")()


def test_op_table_is_populated():
  table = torchax_compat.aten_lowerings()
  assert torch.ops.aten.mm.default in table or torch.ops.aten.mm in table
  assert torch.ops.aten.embedding in table or torch.ops.aten.embedding.default in table
