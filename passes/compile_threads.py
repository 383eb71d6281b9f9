"""Threads that may be inside an XLA compile, and how the process ends while some still run.

An XLA compile cannot be cancelled, so a compile that timed out or was interrupted by Ctrl-C
is abandoned on its thread. If such a daemon thread is still inside XLA when the interpreter
finalizes, CPython (3.10-3.13) ends it with pthread_exit as it takes the GIL back; the forced
unwinding runs through XLA's C++ frames (a noexcept destructor that re-acquires the GIL) and
calls std::terminate: the whole process aborts (SIGABRT, "FATAL: exception not rethrown").
Measured: 3 of 3 Ctrl-C during `ap-xla plan --model llama2-7b --devices 32`, and runs where
every compile timed out. jax's own exit hook also tears the backends down under such a thread.

So every thread that may compile is started here (`start`), and an exit hook, which runs
before jax's (hooks run last-registered first, and this module imports jax first), deals
with those still running:

  * the process is leaving with a known status (`leave(status)` from a command, or an
    exception nobody caught): wait up to `GRACE_S` for them, then end the process at once
    with `os._exit` and that status (an uncaught KeyboardInterrupt ends it by SIGINT, as
    Python itself does), after flushing stdout, stderr and the log handlers;
  * otherwise (the program ended normally while abandoned compiles run): say so and wait for
    them; Ctrl-C stops the wait and exits with status 130.

Nothing is left half-written by `os._exit`: the plan cache and the search dump are written to
a temporary file and renamed, and no checkpoint is written from these threads.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

import jax  # noqa: F401  (imported first: its exit hooks must run after ours)

GRACE_S = 1.0  # how long a process that is leaving waits for compiles to end by themselves
INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)

_lock = threading.Lock()
_threads: set[threading.Thread] = set()
_closing = threading.Event()


def start(target: Callable[[], None], name: str) -> threading.Thread:
  """Starts `target` on a daemon thread the exit hook knows about (use it for anything that compiles)."""
  def run():
    try:
      target()
    finally:
      with _lock:
        _threads.discard(threading.current_thread())
  t = threading.Thread(target=run, daemon=True, name=name)
  with _lock:
    _threads.add(t)
  t.start()
  return t


def running() -> list[threading.Thread]:
  """The registered threads still alive (the caller's own excluded)."""
  me = threading.current_thread()
  with _lock:
    return [t for t in _threads if t.is_alive() and t is not me]


def closing() -> bool:
  """True once the process is exiting: workers take no new work."""
  return _closing.is_set()


def wait(timeout_s: float | None) -> bool:
  """Joins the running threads for at most `timeout_s` seconds (None: no limit); True if none is left."""
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while True:
    alive = running()
    if not alive:
      return True
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0:
      return False
    alive[0].join(0.1 if left is None else min(0.1, left))


def _flush() -> None:
  for handler in logging.getLogger().handlers + logging.getLogger("ap_xla").handlers:
    try:
      handler.flush()
    except Exception:  # a broken handler must not stop the exit
      pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:
      pass


def _end(status: int | str) -> None:
  """Ends the process now, without finalizing the interpreter (which would abort)."""
  _flush()
  if status == "SIGINT":  # what CPython does after an uncaught KeyboardInterrupt
    try:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    except Exception:
      pass
    status = INTERRUPTED
  os._exit(int(status))


def leave(status: int, grace_s: float = GRACE_S) -> int:
  """Returns `status` for the caller to exit with, or ends the process with it if compiles still run.

  For a program's entry point, just before it exits: waits up to `grace_s` for compile threads
  still running, then ends the process at once (`os._exit(status)`) instead of letting the
  interpreter finalize under them.
  """
  if not running():
    return status
  _closing.set()
  try:
    if wait(grace_s):
      return status
  except KeyboardInterrupt:
    status = INTERRUPTED
  _end(status)
  return status  # not reached


def _at_exit() -> None:
  if not running():
    return
  _closing.set()
  uncaught = getattr(sys, "last_value", None)
  if uncaught is not None:  # the program is ending on an exception nobody caught
    status = "SIGINT" if isinstance(uncaught, KeyboardInterrupt) else 1
    try:
      done = wait(GRACE_S)
    except KeyboardInterrupt:
      done, status = False, "SIGINT"
    if not done:
      print(f"ap-xla: exiting without waiting for {len(running())} XLA compile(s) under way "
            "(a compile cannot be cancelled).", file=sys.stderr)
      _end(status)
    return
  try:
    if wait(0.5):  # most end at once: no need to say anything
      return
    print(f"ap-xla: waiting for {len(running())} abandoned XLA compile(s) to end before exiting (a compile "
          "cannot be cancelled; Ctrl-C to exit now).", file=sys.stderr)
    _flush()
    wait(None)
  except KeyboardInterrupt:
    _end(INTERRUPTED)


atexit.register(_at_exit)
