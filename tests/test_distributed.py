"""Two processes x 4 CPU devices train like one process x 8; a dead peer stops the other."""
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import ap_xla
from ap_xla import distributed
from ap_xla.trainer import Trainer
from passes.plan import Plan
from tests.models import assert_tree_close
from tests.scripts.ckpt_worker import BATCH, batch_at, program
from tests.scripts.dist_worker import SEARCH_KWARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "scripts", "dist_worker.py")

# Across processes the gradient all-reduce runs over gloo instead of inside one process; the
# summation order may differ, so losses and parameters are compared to float32 round-off
# (measured with Plan(dp=2, tp=4): losses within 1 ulp, parameters within 3.8e-7 relative).
RTOL = 2e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path, *extra, n=2):
  port = _free_port()
  # AP_XLA_PLAN_CACHE=0: every process really searches (no plan read from a shared cache)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             AP_XLA_PLAN_CACHE="0")
  procs = []
  for i in range(n):
    err = open(tmp_path / f"p{i}.stderr", "w")
    procs.append(subprocess.Popen([sys.executable, WORKER, str(i), str(n), str(port), str(tmp_path), *extra],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
  return procs


def _kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _read_until(procs, marker, timeout=240.0):
  """Stdout lines of every process until each printed a line starting with `marker`."""
  sel = selectors.DefaultSelector()
  for i, p in enumerate(procs):
    sel.register(p.stdout, selectors.EVENT_READ, i)
  lines = {i: [] for i in range(len(procs))}
  waiting, deadline = set(lines), time.monotonic() + timeout
  while waiting and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=1.0):
      line = key.fileobj.readline()
      if not line:
        sel.unregister(key.fileobj)
        waiting.discard(key.data)  # exited; the caller checks what it printed
        continue
      lines[key.data].append(line.strip())
      if line.startswith(marker):
        waiting.discard(key.data)
  if waiting:
    _kill_all(procs)
    pytest.fail(f"processes {sorted(waiting)} did not print {marker!r} in {timeout} s: {lines}")
  return lines


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("dist")
  procs = _launch(tmp, "--steps", "3", "--checkpoint", str(tmp / "ckpt"), "--check-share")
  try:
    lines = _read_until(procs, "DONE")
    rcs = [p.wait(timeout=60) for p in procs]
  finally:
    _kill_all(procs)
  errs = [(tmp / f"p{i}.stderr").read_text()[-3000:] for i in range(2)]
  assert rcs == [0, 0], f"worker exit codes {rcs}:\n" + "\n---\n".join(errs)
  with open(tmp / "result.json") as f:
    result = json.load(f)
  params = dict(np.load(tmp / "params.npz"))
  return lines, result, params, str(tmp / "ckpt")


def test_two_processes_reach_one_plan_and_train_like_one_process(two_process_run, monkeypatch):
  lines, result, params, _ = two_process_run
  monkeypatch.setenv("AP_XLA_PLAN_CACHE", "0")  # a real search, not the processes' cached plan
  plan = Plan.from_dict(result["plan"])
  # both processes printed the same plan and the same losses
  assert [l for l in lines[0] if l.startswith(("PLAN", "STEP"))][0].split(" ROWS")[0] == \
      [l for l in lines[1] if l.startswith(("PLAN", "STEP"))][0].split(" ROWS")[0]
  steps = {i: [l for l in lines[i] if l.startswith("STEP")] for i in range(2)}
  assert steps[0] == steps[1] and len(steps[0]) == 3
  # one process with 8 devices searches the same plan (the search is deterministic) ...
  assert jax.process_count() == 1 and jax.device_count() == 8
  single = ap_xla.search(program("mlp"), **SEARCH_KWARGS)
  assert single.plan == plan
  # ... and trains to the same losses and parameters
  t = Trainer(program("mlp"), plan)
  losses = [float(t.step(batch_at("mlp", i))) for i in range(1, 4)]
  np.testing.assert_allclose(result["losses"], losses, rtol=RTOL)
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(t.params)}
  assert set(flat) == set(params)
  assert_tree_close([params[k] for k in sorted(flat)], [flat[k] for k in sorted(flat)], RTOL, "params ")


def test_plan_searched_on_process_0_is_shared_with_the_other(two_process_run):
  lines, _, _, _ = two_process_run
  shared = [next(l for l in lines[i] if l.startswith("SHARED")) for i in range(2)]
  assert shared[0] == shared[1]  # the whole report arrived: same plan, same candidate count
  assert shared[0].startswith(f"SHARED {Plan(dp=8)!r}")  # the only data-parallel plan without TP


def test_processes_that_disagree_fail_with_both_values(two_process_run):
  lines, _, _, _ = two_process_run
  for i in range(2):
    msg = next(l for l in lines[i] if l.startswith("MISMATCH"))
    assert 'process 0: {"value": 0}' in msg and 'process 1: {"value": 1}' in msg


def test_checkpoint_written_by_two_processes_restores_on_one(two_process_run):
  _, result, params, ckpt_dir = two_process_run
  t = Trainer(program("mlp"), Plan(dp=4, fsdp=True), jax.devices()[:4])  # another plan, 4 devices
  ckpt = t.restore(ckpt_dir)
  assert (ckpt.step, ckpt.data_position, ckpt.plan) == (3, 3, Plan.from_dict(result["plan"]))
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(t.params)}
  for k, v in flat.items():
    np.testing.assert_array_equal(v, params[k])  # exactly what the processes held


def test_local_rows_and_global_batch_on_one_process():
  t = Trainer(program("mlp"), Plan(dp=4, tp=2))
  s = t.built.batch_shardings
  assert distributed.local_rows(s, BATCH) == slice(0, BATCH)  # one process feeds every row
  full = batch_at("mlp", 1)
  gb = distributed.global_batch(full, s, BATCH)
  assert gb["x"].sharding == s["x"] and np.array_equal(np.asarray(gb["x"]), full["x"])
  with pytest.raises(ValueError, match=r"\['x'\] has shape \(8, 32\).*leading size must be 16"):
    distributed.global_batch({"x": full["x"][:8], "y": full["y"][:8]}, s, BATCH)
  with pytest.raises(ValueError, match="share must be one of"):
    distributed.search(program("mlp"), share="all")
  with pytest.raises(ValueError, match="process_id must be an int in \\[0, 2\\), got 2"):
    distributed.initialize("127.0.0.1:1", 2, 2)


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])  # the coordinator's death: -m slow
def test_killing_one_process_stops_the_other_within_60s(tmp_path, victim):
  procs = _launch(tmp_path, "--plan", '{"dp": 8}', "--forever", "--heartbeat", "10")
  try:
    _read_until(procs, "STEP 2")
    os.kill(procs[victim].pid, signal.SIGKILL)
    t0 = time.monotonic()
    survivor = procs[1 - victim]
    try:
      rc = survivor.wait(timeout=60)
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {1 - victim} still running 60 s after process {victim} was killed")
    elapsed = time.monotonic() - t0
  finally:
    _kill_all(procs)
  err = (tmp_path / f"p{1 - victim}.stderr").read_text()
  assert rc != 0 and elapsed < 60
  assert "Terminating process because the JAX distributed service detected fatal errors" in err
  assert "another task died" in err
