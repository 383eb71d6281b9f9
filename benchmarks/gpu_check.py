"""The GPU check: the project's figures on one GPU, in one command, within a time budget.

Runs each measuring step as its own process (benchmarks/gpu_parts.py, benchmarks/oneliner_speed.py)
with a time limit, so one step's failure, hang or out-of-memory is recorded and the rest still
run, and the whole stays within `--budget` seconds:

  1. calibration    passes/calibrate.py on the GPU against the built-in H100/H200 profile
  2. plan quality   the ~1B-parameter Llama whose replicated step does not fit: the search
                    (bf16 mixed precision, the calibrated profile), then every plan that could
                    run, each in a fresh process: predicted vs measured step time and peak
                    memory, Spearman, regret, memory error, MFU of the chosen plan
  3. out of memory  whether a plan the search called feasible ran out of memory
  4. one-liner      a Llama training script through `ap-xla run` against the same script in
                    plain torch on the GPU (bf16 autocast): search time, steps/s, tokens/s

Writes under OUT (at most 8 files, as the device tool brings back): gpu_check.json (every
figure), gpu_check.log (this console), and one log per part (env, calibrate, plan_quality,
oneliner). Prints a readable summary and, as its last line, one JSON object with the headline
figures. `--dry-run` runs the same steps on one CPU device with toy sizes (the test suite does).

Run: bash scripts/gpu_check.sh [OUT] [--dry-run]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import gpu_report  # noqa: E402  (benchmarks/gpu_report.py: figures and the summary)

# Seconds per step on one H100 (the whole: 470 s, inside the 8 minutes); the dry run's
# are far larger because the test machine is slow and shared, not because it does more.
BUDGETS = {
    "gpu": {"total": 470, "env": 30, "calibrate": 45, "pq-search": 140, "pq-run": 50, "oneliner-ap": 120,
            "oneliner-torch": 35},
    "dry": {"total": 1500, "env": 150, "calibrate": 150, "pq-search": 400, "pq-run": 150, "oneliner-ap": 400,
            "oneliner-torch": 150},
}
LOGS = ("env", "calibrate", "plan_quality", "oneliner")


class Check:
  """Runs the steps, keeps the time, writes the logs and the figures."""

  def __init__(self, out: str, dry_run: bool, budgets: dict, python: str):
    self.out, self.dry = out, dry_run
    self.budgets = {**BUDGETS["dry" if dry_run else "gpu"], **budgets}
    self.python = python
    self.t0 = time.monotonic()
    self.work = tempfile.mkdtemp(prefix="ap_xla_gpu_check_")  # caches and step outputs, not brought back
    self.doc = {"benchmark": "gpu_check", "dry_run": dry_run, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "budget_s": self.budgets["total"], "steps": []}
    self.console = open(os.path.join(out, "gpu_check.log"), "w")

  # -- time and output ------------------------------------------------------------------
  def elapsed(self) -> float:
    return time.monotonic() - self.t0

  def left(self) -> float:
    return self.budgets["total"] - self.elapsed()

  def say(self, msg: str) -> None:
    print(msg, flush=True)
    self.console.write(msg + "\n")
    self.console.flush()

  def env(self) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               AP_XLA_PLAN_CACHE="0", JAX_COMPILATION_CACHE_DIR=os.path.join(self.work, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    if self.dry:
      # One CPU device; XLA:CPU's cheaper code generation compiles ~30% faster with the same
      # memory analysis (FIELD_NOTES), which the dry run's timings do not need.
      env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                 "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    else:
      # Explicit: modules that default to the simulated CPU devices (setdefault) must not win.
      env["JAX_PLATFORMS"] = "cuda"
    return env

  def run(self, name: str, cmd: list[str], log: str, timeout: float) -> dict:
    """One step in its own process group, killed at `timeout`; its last JSON line, or the failure."""
    if self.left() < 5:
      self.doc["steps"].append({"step": name, "status": "not run", "seconds": 0.0})
      self.say(f"[{self.elapsed():5.0f} s] {name}: not run, no time left in the budget")
      return {"status": "not run", "error": "no time left in the budget", "seconds": 0.0}
    timeout = min(timeout, self.left())
    t0 = time.monotonic()
    self.say(f"[{self.elapsed():5.0f} s] {name}: {' '.join(cmd[1:])[:150]} (limit {timeout:.0f} s)")
    path = os.path.join(self.out, f"{log}.log")
    with open(path, "a") as f:
      f.write(f"\n===== {name}: {' '.join(cmd)}\n")
      f.flush()
      start = f.tell()
      proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env(),
                              start_new_session=True)
      try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else "failed"
      except subprocess.TimeoutExpired:
        _kill(proc)
        rc, status = None, "timeout"
    with open(path) as f:
      f.seek(start)
      text = f.read()
    result = _last_json(text)
    if status == "ok" and (result is None or result.get("error")):
      status = "failed"  # no figures, or the step caught its own failure (a run out of memory)
    if status != "ok":
      tail = " | ".join(l.strip() for l in text.strip().splitlines()[-4:])
      result = {**(result or {}), "status": status,
                "error": (result or {}).get("error") or (f"exit {rc}: " if rc is not None else
                                                        f"killed after {timeout:.0f} s: ") + tail[-600:]}
    result["status"] = status
    result["seconds"] = round(time.monotonic() - t0, 1)
    self.doc["steps"].append({"step": name, "status": result["status"], "seconds": result["seconds"]})
    self.say(f"[{self.elapsed():5.0f} s] {name}: {result['status']} in {result['seconds']:.1f} s"
             + (f": {result.get('error', '')[:300]}" if result["status"] != "ok" else ""))
    return result

  def save(self) -> None:
    self.doc["seconds"] = round(self.elapsed(), 1)
    path = os.path.join(self.out, "gpu_check.json")
    with open(path + ".tmp", "w") as f:
      json.dump(self.doc, f, indent=1, default=str)
    os.replace(path + ".tmp", path)

  # -- the parts ------------------------------------------------------------------------
  def parts_cmd(self, step: str, *extra: str) -> list[str]:
    cmd = [self.python, os.path.join(HERE, "gpu_parts.py"), step, "--work", self.work]
    return cmd + (["--dry-run"] if self.dry else []) + list(extra)

  def part_env(self) -> bool:
    r = self.run("env", self.parts_cmd("env"), "env", self.budgets["env"])
    self.doc["env"] = r
    self.save()
    if r.get("status") != "ok":  # jax or torch cannot even start: every other step would fail the same way
      self.say("the environment step failed (see env.log); the other parts are not run")
      return False
    if not self.dry and r.get("platform") != "gpu":
      self.say(f"no GPU: jax sees {r.get('device_count')} {r.get('platform')} device(s); the GPU parts are "
               "not run (use --dry-run for a run on CPU)")
      return False
    return True

  def part_calibrate(self) -> None:
    self.doc["calibration"] = self.run("calibrate", self.parts_cmd("calibrate"), "calibrate",
                                       self.budgets["calibrate"])
    self.save()

  def part_plan_quality(self, reserve: float) -> None:
    b = self.budgets
    model = "tiny" if self.dry else "llama-1b"
    # No per-candidate compile limit: a cold first compile on the GPU (autotuning) must not pass
    # for a failed candidate; the step's own limit bounds the search.
    extra = ["--model", model]
    if self.dry:
      # The toy's replicated step must not fit either; two cores gain nothing from compiling
      # plans alone beside the search: only the pruned ones, after it.
      extra += ["--capacity", "auto", "--extra-threads", "0"]
    search = self.run("pq-search", self.parts_cmd("pq-search", *extra), "plan_quality", b["pq-search"])
    pq = {"search": search, "runs": []}
    self.doc["plan_quality"] = pq
    self.save()
    path = os.path.join(self.work, "search.json")
    if not os.path.exists(path):
      return
    with open(path) as f:
      found = json.load(f)
    pq["search_report"] = found  # the search's report and every plan searched alone
    plans = gpu_report.plans_to_run(found)
    steps, warmup = ("2", "1") if self.dry else ("5", "2")
    longest = 0.0
    for i, entry in enumerate(plans):
      left = self.left() - reserve
      # Stop before a run that would eat the next parts' time (the longest run so far says how
      # long one takes; the first one is given its whole limit).
      if left < max(longest * 1.2, 20.0):
        pq["runs"].append({**entry, "status": "not run", "error": f"time budget: {left:.0f} s left for "
                           f"plan runs, the longest took {longest:.0f} s"})
        continue
      r = self.run(f"pq-run {i + 1}/{len(plans)}", self.parts_cmd(
          "pq-run", "--model", found["model"], "--batch", str(found["batch"]), "--plan", json.dumps(entry["plan"]),
          "--steps", steps, "--warmup", warmup), "plan_quality", min(b["pq-run"], left))
      longest = max(longest, r["seconds"])
      pq["runs"].append({**entry, **r, "plan": entry["plan"]})
      self.save()
    pq["figures"] = gpu_report.plan_quality_figures(found, pq["runs"], self.doc.get("calibration"))
    self.save()

  def part_oneliner(self) -> None:
    b = self.budgets
    model, steps, warmup = ("tiny", "2", "1") if self.dry else ("llama-120m", "20", "2")
    script = os.path.join(HERE, "oneliner_speed.py")
    common = ["--model", model, "--steps", steps, "--warmup", warmup]
    ap = self.run("oneliner-ap", [self.python, "-m", "ap_xla", "run", script, "--ap", "--device", "cpu", *common],
                  "oneliner", b["oneliner-ap"])
    device = "cpu" if self.dry else "cuda"
    torch_run = self.run("oneliner-torch", [self.python, script, "--device", device, "--amp", *common], "oneliner",
                         b["oneliner-torch"])
    self.doc["oneliner"] = {"ap": ap, "torch": torch_run, "figures": gpu_report.oneliner_figures(ap, torch_run)}
    self.save()


def _kill(proc: subprocess.Popen) -> None:
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=5)
      return
    except subprocess.TimeoutExpired:
      continue


def _last_json(text: str) -> dict | None:
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("out", nargs="?", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu-check-out"),
                  help="folder for the figures and logs (default: $OUT, else ./gpu-check-out)")
  ap.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0"),
                  help="the same steps on one CPU device with toy sizes (also GPU_CHECK_DRY_RUN=1)")
  ap.add_argument("--budget", type=float, default=None, help="total seconds (default 470 on a GPU)")
  ap.add_argument("--budgets", type=json.loads, default={},
                  help='seconds per step as JSON, e.g. \'{"oneliner-ap": 150}\' (defaults: BUDGETS in this file)')
  ap.add_argument("--python", default=sys.executable, help="the interpreter the steps run with")
  ap.add_argument("--keep-work", action="store_true", help="keep the working folder (caches, search.json)")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  for name in LOGS:  # a fresh run: the logs are appended to step by step
    path = os.path.join(args.out, f"{name}.log")
    if os.path.exists(path):
      os.remove(path)
  unknown = set(args.budgets) - set(BUDGETS["gpu"])
  if unknown:
    ap.error(f"--budgets: unknown steps {sorted(unknown)}; known: {sorted(BUDGETS['gpu'])}")
  check = Check(args.out, args.dry_run, {**args.budgets, **({"total": args.budget} if args.budget else {})},
                args.python)
  b = check.budgets
  check.say(f"GPU check{' (dry run on CPU)' if args.dry_run else ''}: budget {b['total']:.0f} s, output in "
            f"{args.out}, work folder {check.work}")
  try:
    if check.part_env():
      check.part_calibrate()
      check.part_plan_quality(reserve=b["oneliner-ap"] + b["oneliner-torch"])
      check.part_oneliner()
  finally:
    check.save()
    if not args.keep_work:
      shutil.rmtree(check.work, ignore_errors=True)
  summary, headline = gpu_report.summary(check.doc)
  check.say(summary)
  check.doc["headline"] = headline
  check.save()
  check.say(json.dumps(headline))
  return 0 if gpu_report.all_ok(check.doc) else 1


if __name__ == "__main__":
  raise SystemExit(main())
