"""Checkpoints of the whole training state with orbax: sharded as it lives, atomic, reshardable.

A checkpoint is one step directory `<directory>/<step>` holding two orbax items: 'state'
(parameters and optimizer state, each array written shard by shard from the devices that
hold it) and 'meta' (JSON: step, plan, data position, user metadata). Orbax writes a step
into a temporary directory and renames it into place only when every process finished, so a
crash mid-save leaves the previous checkpoints intact and the half-written one invisible (the
next save clears it). A Ctrl-C during `save` lets the step commit, then raises KeyboardInterrupt;
a second Ctrl-C, or an exception, abandons the step and removes its temporary directory.

Restoring reads each array straight into the shardings of the target, which may belong to a
different plan or a different number of devices (orbax reshards on read). Every array's
content checksum is saved in 'meta' and verified after the restore (`checkpoint_integrity`):
a step whose files were altered, truncated or deleted raises `DamagedCheckpointError`, which
names the damaged arrays and the previous committed step to restore instead.

Example:
  >>> from ap_xla import checkpoint
  >>> checkpoint.save('/ckpt', trainer.step_count, trainer.params, trainer.opt_state,
  ...                 plan=trainer.plan, data_position={'epoch': 0, 'batch': 300})
  >>> params, opt = trainer.built.abstract_inputs(trainer.program)[:2]  # another plan is fine
  >>> ckpt = checkpoint.restore('/ckpt', params, opt)
  >>> ckpt.step, ckpt.plan, ckpt.data_position
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from ap_xla import checkpoint_integrity as integrity
from ap_xla.checkpoint_integrity import CheckpointError, DamagedCheckpointError
from passes.plan import Plan

log = logging.getLogger("ap_xla")
PyTree = Any

FORMAT_VERSION = 2  # 2: per-array checksums in 'meta'
_STATE, _META = "state", "meta"
_TMP_MARK = ".orbax-checkpoint-tmp"  # a step's temporary directory is '<step>.orbax-checkpoint-tmp...'


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A restored training state.

  Attributes:
    step: the training step the state is after (steps taken so far).
    params: parameters, placed by the target shardings.
    opt_state: optimizer state, placed by the target shardings.
    plan: the plan the checkpoint was written under (None if the writer gave none).
    data_position: where the data stream was, as the writer gave it (any JSON value), or None.
    metadata: the writer's extra JSON metadata.
    path: the step directory read.
  """
  step: int
  params: PyTree = dataclasses.field(repr=False)
  opt_state: PyTree = dataclasses.field(repr=False)
  plan: Plan | None = None
  data_position: Any = None
  metadata: dict = dataclasses.field(default_factory=dict, repr=False)
  path: str = ""

  def __repr__(self):
    return f"Checkpoint(step={self.step}, plan={self.plan}, data_position={self.data_position!r})"


def _manager(directory: str, max_to_keep: int | None = None, writing: bool = False) -> ocp.CheckpointManager:
  # Synchronous: `save` returns only when the step is committed, and the arrays may be donated
  # to the next training step right after. A writer also clears temporary directories that a
  # killed save left behind.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=False, create=writing,
      cleanup_tmp_directories=writing)
  handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _check_directory(directory) -> str:
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}.")
  return os.path.abspath(os.fspath(directory))


def _check_writable(directory: str) -> None:
  """Raises before anything is written when `directory` cannot be created or written."""
  existing = directory
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"cannot save a checkpoint in {directory}: {existing} is a file, not a folder; "
                             "choose another directory.")
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "the folder" if existing == directory else f"the folder {existing} it would be created in"
    raise PermissionError(f"cannot save a checkpoint in {directory}: {what} is not writable by this user; "
                          "choose a writable directory or change its permissions.")


def steps(directory) -> list[int]:
  """The committed checkpoint steps in `directory`, oldest first (half-written ones are not listed)."""
  directory = _check_directory(directory)
  if not os.path.isdir(directory):
    return []
  with _manager(directory) as m:
    return sorted(m.all_steps())


def latest_step(directory) -> int | None:
  """The newest committed step in `directory`, or None when there is none."""
  s = steps(directory)
  return s[-1] if s else None


def _remove_temporaries(directory: str, step: int, settle_s: float = 1.0, limit_s: float = 10.0) -> None:
  """Deletes the temporary directories a failed save of `step` left (primary process only).

  Array writes already handed to TensorStore go on after the exception and can re-create
  files, so this removes until the directory has stayed gone for `settle_s` (at most `limit_s`;
  whatever is left then is cleared by the next `save`, and is never listed as a step).
  """
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  t_end, quiet_since = time.monotonic() + limit_s, time.monotonic()
  while time.monotonic() < t_end:
    found = [n for n in os.listdir(directory) if n.startswith(f"{step}{_TMP_MARK}")]
    for name in found:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    now = time.monotonic()
    if found:
      quiet_since = now
    elif now - quiet_since >= settle_s:
      return
    time.sleep(0.05)


class _DeferredInterrupt:
  """Holds Ctrl-C while a save runs: the first one lets the save commit, then is delivered;
  a second one is delivered at once (the save is abandoned and its temporary files removed).

  Only on the main thread (where Python handles signals); elsewhere it does nothing.
  """

  def __enter__(self):
    self.pressed, self.prev = 0, None
    if threading.current_thread() is threading.main_thread():
      prev = signal.getsignal(signal.SIGINT)
      if prev not in (signal.SIG_IGN, None):
        self.prev = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):
    self.pressed += 1
    if self.pressed == 1:
      log.warning("Interrupted: finishing the checkpoint save first (interrupt again to abandon it).")
      return
    self._deliver()

  def _deliver(self):
    """Does what the handler we replaced would have done."""
    prev, self.prev = self.prev, None
    signal.signal(signal.SIGINT, prev)
    if prev is signal.default_int_handler:
      raise KeyboardInterrupt
    if callable(prev):
      prev(signal.SIGINT, None)
    else:  # SIG_DFL
      os.kill(os.getpid(), signal.SIGINT)

  def __exit__(self, exc_type, exc, tb):
    if self.prev is None:  # not installed, or already given back by `_deliver`
      return False
    if exc_type is None and self.pressed:
      self._deliver()  # gives the handler back first; a custom one may return normally
    else:
      signal.signal(signal.SIGINT, self.prev)
    return False


def save(directory, step: int, params: PyTree, opt_state: PyTree, *, plan: Plan | None = None,
         data_position: Any = None, metadata: dict | None = None, max_to_keep: int | None = None) -> str:
  """Writes the training state as checkpoint `step` of `directory`, atomically.

  Every process of a multi-process run must call it (orbax coordinates them; process 0
  commits). Arrays are written from their shards, without gathering them on one host.
  A Ctrl-C while it runs is held until the step is committed (press twice to abandon it).

  Args:
    directory: the checkpoint directory (created if missing); steps are subdirectories.
    step: the step number (steps taken so far); must be newer than every step already there.
    params: the parameter pytree (jax.Arrays, sharded as they live).
    opt_state: the optimizer state pytree.
    plan: the plan the state is sharded by (stored so a restore can report or reuse it).
    data_position: where the data stream is (any JSON value: an int, a dict of epoch and
      offset, ...), given back by `restore`.
    metadata: extra JSON-serializable metadata.
    max_to_keep: keep only the newest N checkpoints (None: keep all).

  Returns:
    The committed step directory.

  Raises:
    ValueError: `step` is not newer than the latest checkpoint, or metadata is not JSON.
    PermissionError, NotADirectoryError: `directory` cannot be created or written (nothing is
      written); OSError: writing failed (a full disk, ...); the step is then not kept.

  Example:
    >>> checkpoint.save('/ckpt', 100, params, opt_state, plan=plan, data_position=100)
  """
  directory = _check_directory(directory)
  if not isinstance(step, int) or isinstance(step, bool) or step < 0:
    raise ValueError(f"step must be a non-negative int, got {step!r}.")
  if metadata is not None and not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}.")
  meta = {"format": FORMAT_VERSION, "step": step, "plan": plan.to_dict() if plan is not None else None,
          "data_position": data_position, "metadata": metadata or {},
          "num_devices": len({d for x in jax.tree.leaves(params) for d in x.sharding.device_set}),
          "process_count": jax.process_count()}
  _check_json(meta)
  _check_writable(directory)
  meta["checksums"] = integrity.checksums({"params": params, "opt_state": opt_state})
  with _manager(directory, max_to_keep, writing=True) as m:
    existing = sorted(m.all_steps())
    if existing and step <= existing[-1]:
      what = "already exists" if step in existing else f"is older than the latest step {existing[-1]}"
      raise ValueError(f"checkpoint step {step} {what} in {directory}; save a newer step, or use "
                       "another directory (or delete the newer steps) to branch from an older one.")
    try:
      with _DeferredInterrupt():
        m.save(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            _META: ocp.args.JsonSave(meta)}), force=True)
        m.wait_until_finished()
    except BaseException as e:
      if step not in m.all_steps(read=True):
        # a write error or an abandoning interrupt: the step was not committed; leave no half of it
        _remove_temporaries(directory, step)
      if isinstance(e, OSError):  # a full disk, a folder that turned read-only, ...
        raise OSError(e.errno, f"saving checkpoint step {step} in {directory} failed: {e.strerror or e}; "
                      "nothing of this step was kept and the earlier steps are intact") from e
      raise
  path = os.path.join(directory, str(step))
  log.info("Saved checkpoint step %d to %s%s.", step, path, f" ({plan})" if plan else "")
  return path


def _check_json(meta: dict) -> None:
  try:
    json.dumps(meta)
  except (TypeError, ValueError) as e:
    raise ValueError(f"data_position and metadata must be JSON-serializable (dicts, lists, str, "
                     f"numbers, bools, None): {e}") from None


def _target(tree: PyTree, shardings: PyTree | None, what: str) -> PyTree:
  """ShapeDtypeStructs with shardings from arrays / ShapeDtypeStructs and optional shardings."""
  if shardings is None:
    def leaf(path, x):
      s = getattr(x, "sharding", None)
      if s is None:
        raise ValueError(f"{what}{jax.tree_util.keystr(path)} has no sharding to restore into; pass "
                         f"jax.Arrays, ShapeDtypeStructs with sharding=..., or the shardings argument.")
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree_util.tree_map_with_path(leaf, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


_dotted = integrity.dotted


def _check_compatible(stored: PyTree, target: PyTree, directory: str, step: int) -> None:
  """Names the leaves whose structure or shape differ between the checkpoint and the target."""
  flat_s = {_dotted(p): x for p, x in jax.tree_util.tree_leaves_with_path(stored)}
  flat_t = {_dotted(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
  problems = [f"{k}: missing in the checkpoint" for k in flat_t if k not in flat_s]
  problems += [f"{k}: in the checkpoint but not in the target" for k in flat_s if k not in flat_t]
  problems += [f"{k}: checkpoint shape {tuple(flat_s[k].shape)}, target {tuple(flat_t[k].shape)}"
               for k in flat_t if k in flat_s and tuple(flat_s[k].shape) != tuple(flat_t[k].shape)]
  if problems:
    shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise ValueError(f"checkpoint step {step} in {directory} does not match the target state "
                     f"({len(problems)} leaves differ):\n  {shown}\nRestore into the program (model "
                     "and optimizer) the checkpoint was written from.")


def restore(directory, params: PyTree, opt_state: PyTree, *, step: int | None = None,
            param_shardings: PyTree | None = None, opt_shardings: PyTree | None = None) -> Checkpoint:
  """Reads a checkpoint into the given shardings (any plan, any device count).

  Args:
    directory: the checkpoint directory given to `save`.
    params: the target parameters: jax.Arrays or ShapeDtypeStructs (shape, dtype and, unless
      `param_shardings` is given, sharding per leaf). Nothing is read from their values.
    opt_state: the target optimizer state, likewise.
    step: the step to read (default: the latest committed one).
    param_shardings: shardings for `params` (override theirs).
    opt_shardings: shardings for `opt_state` (override theirs).

  Returns:
    A `Checkpoint` with the arrays placed by the target shardings, the step, the plan it was
    written under, the data position and the metadata.

  Raises:
    FileNotFoundError: no committed checkpoint (or not that step) in `directory`.
    ValueError: the checkpoint's arrays do not match the target's structure or shapes.
    CheckpointError: `directory` is not a checkpoint directory (a ValueError).
    DamagedCheckpointError: a file of the step is missing, truncated or altered (an array
      differs from its saved checksum); it names the damaged items and the previous step.

  Example:
    >>> params, opt = built.abstract_inputs(program)[:2]   # ShapeDtypeStructs with shardings
    >>> ckpt = checkpoint.restore('/ckpt', params, opt)
  """
  directory = _check_directory(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointError(f"{directory} is a file, not a checkpoint directory; pass the directory given to save().")
  available = steps(directory)
  if not available:
    raise FileNotFoundError(f"no committed checkpoint in {directory}.")
  if step is None:
    step = available[-1]
  elif step not in available:
    raise FileNotFoundError(f"checkpoint step {step} is not in {directory}; committed steps: {available}.")
  target = {"params": _target(params, param_shardings, "params"),
            "opt_state": _target(opt_state, opt_shardings, "opt_state")}
  path = os.path.join(directory, str(step))
  integrity.check_items(directory, step, available, (_STATE, _META))
  damaged = functools.partial(integrity.damaged, directory, step, available)
  with _manager(directory) as m:
    # The metadata first, on its own: an error reading it is then known to be about it.
    try:
      meta = m.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except Exception as e:
      raise damaged(f"its metadata ({os.path.join(path, _META)}) cannot be read: {integrity.short_error(e)}",
                    [os.path.join(path, _META)]) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
      raise damaged(f"its metadata ({os.path.join(path, _META)}) is not the metadata save() writes "
                    f"(got {str(meta)[:100]})", [os.path.join(path, _META)])
    try:
      stored = m.item_metadata(step)[_STATE]
    except Exception as e:
      raise damaged(f"the description of its arrays cannot be read: {integrity.short_error(e)}",
                    [os.path.join(path, _STATE)]) from None
    if stored is not None:
      _check_compatible(getattr(stored, "tree", stored), target, directory, step)
    try:
      state = m.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))[_STATE]
    except Exception as e:  # TensorStore: a data file missing, truncated or undecodable
      raise damaged(*integrity.read_failure(e, os.path.join(path, _STATE))) from None
  integrity.verify(state, meta, damaged)
  plan = Plan.from_dict(meta["plan"]) if meta.get("plan") else None
  ckpt = Checkpoint(step=meta["step"], params=state["params"], opt_state=state["opt_state"],
                    plan=plan, data_position=meta.get("data_position"), metadata=meta.get("metadata", {}),
                    path=path)
  log.info("Restored checkpoint step %d from %s (written under %s on %s devices).", ckpt.step, ckpt.path,
           plan, meta.get("num_devices"))
  return ckpt

