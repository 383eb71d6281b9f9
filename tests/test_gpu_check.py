"""The GPU check (issue 18): its dry run on CPU, its time budget, its output and its wheel list."""
import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402
from passes.evaluate import ANALYSIS_OPTIONS  # noqa: E402
import gpu_report  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  """`bash scripts/gpu_check.sh OUT --dry-run`, once for the module: (OUT, completed process, figures)."""
  out = tmp_path_factory.mktemp("gpu_check_out")
  env = dict(os.environ, PYTHON=sys.executable)
  run = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
  doc = None
  if (out / "gpu_check.json").exists():
    doc = json.loads((out / "gpu_check.json").read_text())
  return out, run, doc


@pytest.mark.slow  # ~90 s: the whole check on CPU (scripts/bench.sh slow_tests)
def test_dry_run_runs_every_step(dry_run):
  out, run, doc = dry_run
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  head = json.loads(run.stdout.strip().splitlines()[-1])  # the last line: one JSON object
  assert head["benchmark"] == "gpu_check" and head["dry_run"] and head["all_ok"]
  steps = [s["step"] for s in doc["steps"]]
  assert steps[:3] == ["env", "calibrate", "pq-search"] and steps[-2:] == ["oneliner-ap", "oneliner-torch"]
  assert all(s["status"] == "ok" for s in doc["steps"]), doc["steps"]
  for part in ("1. calibration", "2. plan quality", "3. out of memory", "4. the torch one-liner"):
    assert part in run.stdout


@pytest.mark.slow  # ~90 s: the whole check on CPU (scripts/bench.sh slow_tests)
def test_dry_run_figures(dry_run):
  _, _, doc = dry_run
  cal = doc["calibration"]["compare"]
  assert cal["bf16_flops"]["measured"] > 0 and cal["memory_bandwidth"]["ratio"] > 0
  f = doc["plan_quality"]["figures"]
  # The toy is sized like the GPU model: its replicated step is over budget, so the search
  # recomputes or micro-batches, and pruned plans are run too (searched alone).
  # (over the budget as compiled, or left uncompiled by the screen: over it or unable to win)
  assert f["replicated"]["verdict"] in ("over_budget", "pruned") and f["replicated"]["fits"] is False
  assert f["verdicts"].get("pruned", 0) >= 1 and f["verdicts"]["chosen"] == 1
  assert {r["source"] for r in f["rows"]} == {"search", "pruned, searched alone"}
  assert f["measured"] == f["planned"] >= 3
  assert f["spearman"] is not None and -1 <= f["spearman"] <= 1
  assert f["regret"] >= 1.0 and f["memory_err_max"] is not None
  assert f["mfu"]["datasheet"] > 0 and f["feasible_oom"] == []
  for r in f["rows"]:
    assert r["measured_s"] > 0 and r["measured_bytes"] > 0
    assert r["child_predicted_bytes"] == r["predicted_bytes"]  # the run compiled what the search judged
    hits, requests = map(int, r["cache"].split("/"))
    assert requests >= 1, r
    if not ANALYSIS_OPTIONS.get("cpu"):
      # ... and found it in the persistent cache the search filled (on CPU the search's analysis
      # compiles use their own options, LLVM -O0: another cache key than the run's compile)
      assert hits >= 1, r
  o = doc["oneliner"]["figures"]
  assert o["tokens_per_s_ratio"] > 0 and o["ap"]["search_s"] > 0
  # The same script, model, seed and batches both ways, bf16 both ways: the first losses agree.
  assert o["first_loss"]["rel_diff"] < 0.02, o["first_loss"]


@pytest.mark.slow  # ~90 s: the whole check on CPU (scripts/bench.sh slow_tests)
def test_dry_run_output_fits_the_device_tool(dry_run):
  """At most 8 files come back from $OUT, at most 2 folders down, named in [A-Za-z0-9._-]."""
  out, _, _ = dry_run
  files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
  assert sorted(files) == sorted(["gpu_check.json", "gpu_check.log"] + [f"{n}.log" for n in gpu_check.LOGS])
  assert len(files) <= 8
  for f in files:
    assert f.count(os.sep) <= 2 and re.fullmatch(r"[A-Za-z0-9._/-]+", f), f


def test_gpu_budget_fits_eight_minutes():
  b = gpu_check.BUDGETS["gpu"]
  fixed = b["env"] + b["calibrate"] + b["pq-search"] + b["oneliner-ap"] + b["oneliner-torch"]
  assert b["total"] <= 8 * 60 - 10
  assert b["total"] - fixed >= 2 * b["pq-run"]  # room for the plan runs after the fixed steps


def test_plans_to_run_order_and_spearman():
  cand = lambda mb, rc, verdict, est: {"plan": {"dp": 1, "tp": 1, "pp": 1, "mb": mb, "recompute": rc},
                                       "verdict": verdict, "est_time_s": est, "memory_bytes": 10, "details": {}}
  found = {"result": {"candidates": [cand(2, "full", "chosen", 1.0), cand(8, "none", "feasible", 3.0),
                                     cand(4, "none", "feasible", 2.0), cand(1, "none", "over_budget", 0.5),
                                     cand(4, "full", "pruned", None)]},
           "extra": [cand(4, "full", "chosen", 1.5), cand(16, "full", "over_budget", 9.0)]}
  order = [(e["plan"]["mb"], e["plan"]["recompute"], e["source"]) for e in gpu_report.plans_to_run(found)]
  assert order == [(2, "full", "search"), (4, "none", "search"), (8, "none", "search"),
                   (4, "full", "pruned, searched alone")]
  assert gpu_report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert gpu_report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert gpu_report.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833)  # ties: average ranks
  assert gpu_report.spearman([1, 2], [1, 2]) is None


# -- the wheel list ------------------------------------------------------------------------

ENTRY_POINTS = ["benchmarks/gpu_check.py", "benchmarks/gpu_parts.py", "benchmarks/gpu_report.py",
                "benchmarks/oneliner_speed.py", "benchmarks/plan_quality.py", "ap_xla/__main__.py"]
PROJECT = ("ap_xla", "passes", "bridge")


def _names(path: str) -> list[str]:
  lines = open(os.path.join(ROOT, path)).read().splitlines()
  return [l.strip().lower() for l in lines if l.strip() and not l.startswith("#")]


def _normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: str, root: str = ROOT, module_level_only: bool = False) -> list[str]:
  """Absolute names of the modules a file imports (inside functions too, unless module_level_only)."""
  tree = ast.parse(open(path).read())
  if module_level_only:  # what runs at import: not inside function bodies (try / if blocks are)
    nodes, todo = [], list(tree.body)
    while todo:
      n = todo.pop()
      if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        nodes.append(n)
        todo += list(ast.iter_child_nodes(n))
  else:
    nodes = list(ast.walk(tree))
  out = []
  for node in nodes:
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative to the file's package
        pkg = os.path.relpath(os.path.dirname(path), root).split(os.sep)
        base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
      out.append(base)
      out += [f"{base}.{a.name}" for a in node.names]
  return out


def _module_file(name: str) -> str | None:
  """The project file (or a benchmark script beside the others) that a module name is, if any."""
  parts = name.split(".")
  if parts[0] in PROJECT:
    cands = [os.path.join(ROOT, *parts) + ".py", os.path.join(ROOT, *parts, "__init__.py")]
  else:
    cands = [os.path.join(ROOT, "benchmarks", *parts) + ".py"]
  return next((c for c in cands if os.path.isfile(c)), None)


def third_party_imports() -> dict[str, str]:
  """Top-level names of every third-party module the GPU check's code imports: {name: a file importing it}.

  Follows the project's own imports from the check's entry points (a package's __init__ brings
  in all of its modules: over-inclusive, never under).
  """
  seen, todo, found = set(), [os.path.join(ROOT, p) for p in ENTRY_POINTS], {}
  while todo:
    path = todo.pop()
    if path in seen:
      continue
    seen.add(path)
    if path.endswith("__init__.py"):
      folder = os.path.dirname(path)
      todo += [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py")]
      todo += [os.path.join(folder, d, "__init__.py") for d in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, d, "__init__.py"))]
    for name in _imports(path):
      parts = name.split(".")
      local = [f for f in (_module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if f]
      if local:
        todo += local
      elif parts[0] not in sys.stdlib_module_names and parts[0] not in PROJECT:
        found.setdefault(parts[0], os.path.relpath(path, ROOT))
  return found


def test_every_import_of_the_check_is_in_the_image_or_carried():
  image = {_normal(n) for n in _names("scripts/gpu_image_packages.txt")}
  wheels = {_normal(re.split(r"[=<>~! ]", r)[0]) for r in _names("scripts/gpu_wheels.txt")}
  assert wheels == {"torchax"}, wheels
  assert not wheels & image, "a carried wheel duplicates the image's package; carry it only for another version"
  dists = md.packages_distributions()
  imports = third_party_imports()
  assert {"jax", "torch", "torchax", "transformers", "flax", "optax", "numpy"} <= set(imports), sorted(imports)
  missing = {}
  for top, where in sorted(imports.items()):
    names = {_normal(d) for d in dists.get(top, [])}
    assert names, f"{top!r} (imported by {where}) is not installed here, so its distribution is unknown"
    if not names & (image | wheels):
      missing[top] = (sorted(names), where)
  assert not missing, f"imported by the GPU check but neither in the device image nor carried: {missing}"


def test_carried_wheels_need_nothing_else():
  """Each carried wheel's own requirements, and torchax's module-level imports, are in the image."""
  image = {_normal(n) for n in _names("scripts/gpu_image_packages.txt")}
  for req in _names("scripts/gpu_wheels.txt"):
    name, version = re.split(r"==", req)
    assert md.version(name) == version, f"the wheel list pins {req}; the tests ran with {md.version(name)}"
    needs = [r for r in (md.requires(name) or []) if "extra ==" not in r]
    for r in needs:
      assert _normal(re.split(r"[ ;<>=!~\[(]", r)[0]) in image, f"{name} requires {r}, absent from the image"
  pkg = os.path.dirname(str(md.distribution("torchax").locate_file("torchax/__init__.py")))
  dists = md.packages_distributions()
  for d, _, fs in os.walk(pkg):
    for f in fs:
      if f.endswith(".py"):
        for mod in _imports(os.path.join(d, f), os.path.dirname(pkg), module_level_only=True):
          top = mod.split(".")[0]
          if top in sys.stdlib_module_names or top == "torchax":
            continue
          assert {_normal(x) for x in dists.get(top, [])} & image, f"torchax/{f} imports {top}"


def test_summary_of_a_run_with_failures():
  """The rarer branches (a failed step, a run out of memory, a plan left out for time) summarize
  without error: a GPU run happens once."""
  plan = lambda mb, rc: {"dp": 1, "tp": 1, "pp": 1, "mb": mb, "recompute": rc, "fsdp": False, "bf16": True}
  cand = lambda p, verdict, est, mem: {"plan": p, "verdict": verdict, "est_time_s": est, "memory_bytes": mem,
                                       "details": {"flops": 3e12}}
  found = {"model": "llama-1b", "params": 1_032_931_328, "batch": 16, "config": {"seq": 2048}, "model_flops": 2e15,
           "profile_source": "calibrated", "profile": {"peak_flops": {"bf16": 8e14}},
           "result": {"plan": plan(1, "full"), "budget_bytes": 48 * 2**30, "capacity_bytes": 60 * 2**30,
                      "timings": {"total": 80.0},
                      "candidates": [cand(plan(1, "full"), "chosen", 1.3, 40 * 2**30),
                                     cand(plan(16, "none"), "feasible", 1.5, 30 * 2**30),
                                     cand(plan(1, "none"), "over_budget", 1.0, 300 * 2**30),
                                     cand(plan(2, "full"), "pruned", None, None)]},
           "extra": [cand(plan(2, "full"), "chosen", 1.4, 30 * 2**30)]}
  entries = gpu_report.plans_to_run(found)
  runs = [{**entries[0], "status": "ok", "times": [1.5, 1.6, 1.4], "measured_bytes": 41 * 2**30,
           "predicted_bytes": 40 * 2**30, "compile_s": 3.0, "cache_hits": 1, "cache_requests": 4},
          {**entries[1], "status": "failed", "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory", "oom": True},
          {**entries[2], "status": "not run", "error": "time budget"}]
  calibration = {"status": "ok", "builtin": {"name": "h100", "peak_flops": {"bf16": 989.4e12}},
                 "calibrated": {"peak_flops": {"bf16": 7.9e14}},
                 "compare": {"bf16_flops": {"builtin": 989.4e12, "measured": 7.9e14, "ratio": 0.8}}}
  f = gpu_report.plan_quality_figures(found, runs, calibration)
  assert f["feasible_oom"] == ["Plan(mb=16, recompute='none', bf16)"] and f["measured"] == 1
  assert f["spearman"] is None and f["regret"] == 1.0
  assert f["mfu"]["datasheet"] == pytest.approx(2e15 / 1.5 / 989.4e12)
  doc = {"dry_run": False, "date": "2026-12-06", "budget_s": 470, "seconds": 400.0,
         "steps": [{"step": "env", "status": "ok", "seconds": 9.0}, {"step": "oneliner-torch", "status": "timeout",
                                                                     "seconds": 35.0}],
         "env": {"versions": {"jax": "0.11.2"}, "device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu",
                 "device_count": 1},
         "calibration": calibration, "plan_quality": {"figures": f},
         "oneliner": {"ap": {"status": "ok"}, "torch": {"status": "timeout", "error": "killed after 35 s"},
                      "figures": {}}}
  text, head = gpu_report.summary(doc)
  assert "out of memory" in text and "Plan(mb=16, recompute='none', bf16)" in text
  assert "not run (time): 1" in text and "timeout: killed after 35 s" in text
  assert head["all_ok"] is False and head["oom"]["feasible_oom"] and "oneliner" not in head
  json.dumps(head)
