"""Damaged checkpoints are never restored silently: each damage names what is damaged and
offers the previous step; folders that are not checkpoints and unwritable folders are named."""
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ap_xla import checkpoint, checkpoint_integrity as integrity
from ap_xla.checkpoint_integrity import CheckpointError, DamagedCheckpointError
from ap_xla.trainer import Trainer
from passes.plan import Plan
from tests.scripts import ckpt_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A failed read leaves orbax's other read coroutines to be closed by the garbage collector, which
# reports them as unraisable; the error the restore raised is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Steps 1 and 2 of the mlp on Plan(dp=8), and the host copies of their parameters."""
  d = str(tmp_path_factory.mktemp("ckpt") / "run")
  t = Trainer(worker.program("mlp"), Plan(dp=8), jax.devices())
  params = {}
  for step in (1, 2):
    t.step(worker.batch_at("mlp", step))
    t.save(d)
    params[step] = jax.tree.map(np.asarray, t.params)
  return {"dir": d, "trainer": t, "params": params}


def _copy(saved, tmp_path):
  d = str(tmp_path / "run")
  shutil.copytree(saved["dir"], d)
  return d, os.path.join(d, "2")


def _data_files(step_dir):
  """The files holding the arrays' bytes (orbax's OCDBT data files of process 0). Some of their
  bytes are never read: a chunk written twice (by two replicas) keeps only its last copy."""
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  return [os.path.join(data, f) for f in os.listdir(data)]


def _restore_fails(saved, d, match):
  with pytest.raises(DamagedCheckpointError, match=match) as e:
    saved["trainer"].restore(d)
  err = e.value
  assert err.path == os.path.join(d, "2") and err.previous == 1 and err.items
  assert f"checkpoint step 2 in {d} is damaged: " in str(err)
  assert f"The previous committed step 1 is still there: restore it with step=1" in str(err)
  # and the previous step is still good
  t = saved["trainer"]
  assert t.restore(d, step=1).step == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, t.params), saved["params"][1])
  return err


def test_checksums_are_the_same_on_host_and_device_and_for_any_sharding():
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 12))
  layouts = [P(), P("a", "b"), P(None, "b"), P("b")]
  trees = [{"w": jax.device_put(x, NamedSharding(mesh, s)), "h": jax.device_put(x.astype(jnp.bfloat16),
                                                                                 NamedSharding(mesh, s)),
            "n": jnp.int32(7), "m": x > 0} for s in layouts]
  sums = [integrity.checksums(t, on_host=True) for t in trees]
  sums += [integrity.checksums(t, on_host=False) for t in trees[1::2]]  # each layout compiles: two of them
  assert all(s == sums[0] for s in sums) and len(sums[0]) == 4
  changed = integrity.checksums({"w": trees[1]["w"].at[3, 5].add(1e-6), "h": trees[0]["h"], "n": jnp.int32(7),
                                 "m": trees[0]["m"]})
  assert changed["w"]["sum"] != sums[0]["w"]["sum"] and changed["h"] == sums[0]["h"]
  swapped = integrity.checksums({"w": x[::-1]})  # the same values in other places
  assert swapped["w"]["sum"] != sums[0]["w"]["sum"]
  assert integrity.mismatches(trees[2], sums[0]) == []


def test_flipped_bytes_in_a_state_file_fail_the_restore(saved, tmp_path):
  """64 bytes flipped in the data files, at one of several places each time: each restore fails
  naming what is damaged, or (only bytes no restore reads were hit) gives back exactly what was saved."""
  t, detected = saved["trainer"], []
  for i, where in enumerate((0.2, 0.35, 0.5, 0.65, 0.8)):
    d, step = _copy(saved, tmp_path / str(i))
    for path in _data_files(step):
      data = bytearray(open(path, "rb").read())
      at = int(len(data) * where)
      data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
      with open(path, "wb") as f:
        f.write(data)
    try:
      ckpt = t.restore(d)
    except DamagedCheckpointError as e:  # TensorStore could not decode it, or the checksum caught it
      assert "differ from the checksums saved with them" in str(e) or "reading the array" in str(e), str(e)
      assert e.previous == 1 and all(n.startswith(("params.", "opt_state.")) for n in e.items), str(e)
      detected.append(where)
      continue
    assert ckpt.step == 2  # not damaged in anything read: exactly the saved values
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, t.params), saved["params"][2])
  assert detected, "no flip reached the arrays' data"


def test_altered_values_are_caught_by_the_checksum(saved, tmp_path):
  """Values that decode fine but are not the saved ones (here: the stored sum of one array changed)."""
  d, step = _copy(saved, tmp_path)
  path = os.path.join(step, "meta", "metadata")
  meta = json.load(open(path))
  meta["checksums"]["params.a.kernel"]["sum"] = "0" * 16
  json.dump(meta, open(path, "w"))
  err = _restore_fails(saved, d, r"1 array\(s\) differ from the checksums saved with them \(params\.a\.kernel\): "
                                 "their bytes changed after the save")
  assert err.items == ("params.a.kernel",)


@pytest.mark.parametrize("damage, match", [
    ("truncate", r"reading the array (params|opt_state)\.\S+ failed \(.*\); a file of it is missing, truncated"),
    ("delete", r"reading the array (params|opt_state)\.\S+ failed"),
    ("delete metadata", r"its metadata \(.*/2/meta\) cannot be read: FileNotFoundError"),
    ("garble metadata", r"its metadata \(.*/2/meta\) cannot be read: JSONDecodeError"),
    ("delete state", r"its item 'state' \(.*/2/state\) is missing"),
])
def test_missing_or_broken_files_name_what_is_damaged(saved, tmp_path, damage, match):
  d, step = _copy(saved, tmp_path)
  if damage == "truncate":  # to 16 bytes: every value stored in a data file is longer (orbax inlines < 1 KiB)
    for path in _data_files(step):
      os.truncate(path, min(16, os.path.getsize(path)))
  elif damage == "delete":
    for path in _data_files(step):
      os.unlink(path)
  elif damage == "delete metadata":
    os.unlink(os.path.join(step, "meta", "metadata"))
  elif damage == "garble metadata":
    open(os.path.join(step, "meta", "metadata"), "w").write('{"step": 2, "pla')
  else:
    shutil.rmtree(os.path.join(step, "state"))
  _restore_fails(saved, d, match)


def test_a_folder_that_is_not_a_checkpoint(saved, tmp_path):
  os.makedirs(tmp_path / "runs" / "5" / "logs")
  with pytest.raises(CheckpointError, match=f"{tmp_path / 'runs'} is not a checkpoint directory written by "
                                            r"ap_xla: its step folder .*/5 holds \['logs'\]"):
    saved["trainer"].restore(tmp_path / "runs")
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(CheckpointError, match=f"{tmp_path / 'a_file'} is a file, not a checkpoint directory"):
    saved["trainer"].restore(tmp_path / "a_file")


def test_a_checkpoint_without_checksums_restores_with_a_warning(saved, tmp_path, caplog):
  d, step = _copy(saved, tmp_path)
  path = os.path.join(step, "meta", "metadata")
  meta = json.load(open(path))
  del meta["checksums"]
  meta["format"] = 1
  json.dump(meta, open(path, "w"))
  with caplog.at_level(logging.WARNING, logger="ap_xla"):
    assert saved["trainer"].restore(d).step == 2
  assert "saved without checksums (by an older ap-xla): its contents are not verified" in caplog.text


# Root writes anywhere: the save runs as 'nobody', once everything it imports is loaded (the
# Python installation itself may not be readable by that user).
_SAVE_AS_NOBODY = """
import os, sys, tempfile
import jax
from ap_xla import checkpoint
x = jax.numpy.ones((4,))
checkpoint.save(tempfile.mkdtemp(), 0, {"w": x}, {"m": x})  # loads what a save imports lazily
os.setgid(65534); os.setuid(65534)
try:
  checkpoint.save(sys.argv[1], 0, {"w": x}, {"m": x})
except PermissionError as e:
  print(e); sys.exit(3)
"""


def test_saving_into_a_folder_that_cannot_be_written(saved, tmp_path):
  under_file = tmp_path / "a_file"
  under_file.write_text("x")
  with pytest.raises(NotADirectoryError, match=f"cannot save a checkpoint in {under_file}/ckpt: {under_file} is "
                                               "a file, not a folder"):
    saved["trainer"].save(under_file / "ckpt")
  folder = tempfile.mkdtemp(prefix="ap_xla_readonly_")
  try:
    os.chmod(folder, 0o555)
    target = os.path.join(folder, "ckpt")
    message = (f"cannot save a checkpoint in {target}: the folder {folder} it would be created in is not "
               "writable by this user")
    if os.geteuid() != 0:
      with pytest.raises(PermissionError, match=message):
        saved["trainer"].save(target)
    else:
      env = dict(os.environ, PYTHONPATH=ROOT)
      r = subprocess.run([sys.executable, "-c", _SAVE_AS_NOBODY, target], capture_output=True, text=True,
                         env=env, cwd="/", timeout=120)
      assert r.returncode == 3 and message in r.stdout, (r.stdout, r.stderr[-2000:])
    assert os.listdir(folder) == []
  finally:
    os.chmod(folder, 0o755)
    shutil.rmtree(folder)
