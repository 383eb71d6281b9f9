"""The `ap-xla` command: `plan` searches a model's parallel plans for a target cluster; `run`
launches a training script (`ap_xla.launcher`).

`ap-xla plan` compiles the candidates for N simulated CPU devices from abstract shapes (nothing
is allocated) and judges memory and speed with the target's hardware profile. The device count
is set (XLA_FLAGS) after parsing the arguments and before jax creates its CPU backend. Exit
codes: 0 a plan was chosen; 1 planning failed (out of memory, too few devices); 2 bad arguments
(including options that leave no candidate for the device count and batch); 130 interrupted.

Example:
  $ ap-xla plan --model llama2-7b --hardware h100 --devices 32 --batch 32 --seq 1024
  $ ap-xla plan --model path/to/config.json --hardware a100 --devices 8 --batch 16 --json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import os
import re
import sys
import time

from passes.plan import RECOMPUTE_POLICIES

PROG = "ap-xla"
# XLA:CPU (jaxlib 0.10.2) compiles for at most 2048 host devices: at 2049 every compile fails
# with "Multiprocess computations aren't implemented on the CPU backend" (and starting 8192
# devices takes 38 s, 1,000,000 never finishes). Measured on this project's machine.
MAX_SIMULATED_DEVICES = 2048
AUTO = ("auto",)
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _arg(name, kind, words=(), lo=1):
  """An argparse type: an int >= `lo` or a bool (`kind`), or one of the literal `words`."""
  def parse(v):
    key = v.strip().lower()
    if key in words:
      return key
    if kind is bool and key in _BOOLS:
      return _BOOLS[key]
    if kind is int and key.isdigit() and int(key) >= lo:
      return int(key)
    what = "true or false" if kind is bool else "a positive int" if lo == 1 else f"an int >= {lo}"
    raise argparse.ArgumentTypeError(f"{name} must be {what}{' or ' + repr(list(words)) if words else ''}, "
                                     f"got {v!r}")
  return parse


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description="Automatic parallelization for JAX/XLA training.")
  sub = parser.add_subparsers(dest="command", metavar="{plan,run}")
  sub.add_parser("run", help="launch a training script with Advanced Parallelization (ap-xla run script.py ...)")
  p = sub.add_parser("plan", help="search the parallel plans of a model for a target cluster")
  add = p.add_argument
  add("--model", required=True, help="a preset (llama2-7b, llama2-13b, gpt2-xl, ...) or a HF config.json path")
  add("--hardware", required=True, help="hardware profile: h100, h200, a100, cpu, or a profile JSON file")
  add("--devices", required=True, type=_arg("--devices", int), help="number of devices")
  add("--batch", required=True, type=_arg("--batch", int), help="global batch size")
  add("--seq", type=_arg("--seq", int), help="sequence length (default: 2048, or the model's positions)")
  add("--device-memory", help="per-device memory instead of the profile's, e.g. 40GB")
  add("--memory-ratio", type=float, help="percent of device memory a plan may use (default 80)")
  o = p.add_argument_group("Advanced Parallelization options ('auto' lets the search choose)").add_argument
  for flag in ("--num-stages", "--num-micro-batches", "--tensor-parallel"):
    o(flag, type=_arg(flag, int, AUTO), default="auto", metavar="N|auto")
  o("--activation-recomputation", type=_arg("--activation-recomputation", bool, AUTO + RECOMPUTE_POLICIES),
    default="auto", metavar="auto|true|false|" + "|".join(RECOMPUTE_POLICIES[1:]))
  o("--distribute-parameter", type=_arg("--distribute-parameter", bool, AUTO), default="auto",
    metavar="auto|true|false", help="ZeRO-3: shard parameters, gradients and optimizer state")
  o("--mixed-precision", action=argparse.BooleanOptionalAction, default=True, help="bf16 compute (default: on)")
  o("--no-pipeline-parallel", dest="pipeline_parallel", action="store_false", help="no pipeline stages")
  r = p.add_argument_group("output and search").add_argument
  r("--json", action="store_true", help="print one JSON document on stdout instead of the table")
  r("--top", type=_arg("--top", int, lo=0), default=20, help="candidates shown in the table (0: all; default 20)")
  r("--max-threads", type=_arg("--max-threads", int), help="compiles at once (default: the CPU count)")
  r("--exhaustive", action="store_true", help="compile every candidate instead of only those the analytic "
    "screen cannot rule out (minutes instead of seconds)")
  r("--no-cache", action="store_true", help="search even if the plan cache has this plan")
  r("--cache-dir", help="plan cache folder (default: AP_XLA_CACHE_DIR or ~/.cache/ap_xla)")
  r("-q", "--quiet", action="store_true", help="no progress log on stderr")
  return parser


def main(argv=None) -> int:
  """Runs `ap-xla`; returns the exit code (0 ok, 1 planning failed, 2 bad arguments, 130 Ctrl-C).

  Run as the program (`argv` None), it ends the process itself when XLA compiles it abandoned
  (after Ctrl-C or a timeout) still run, with the same code (see `passes.compile_threads`).
  """
  code = _main(argv)
  threads = sys.modules.get("passes.compile_threads")  # imported only if something compiled
  return threads.leave(code) if argv is None and threads is not None else code


def _main(argv) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "run":
    launcher = importlib.import_module("ap_xla.launcher")  # imports torch: only for `run`
    return int(launcher.main(argv[1:]) or 0)
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse exits 2 on a usage error, 0 on --help
    return int(e.code or 0)
  if args.command != "plan":
    return parser.print_help(sys.stderr) or 2
  if args.devices > MAX_SIMULATED_DEVICES:
    return _fail(f"--devices {args.devices}: at most {MAX_SIMULATED_DEVICES} devices can be simulated here (XLA's "
                 f"CPU backend compiles for no more); plan for {MAX_SIMULATED_DEVICES} or fewer, e.g. one "
                 "pipeline or data-parallel group of the cluster.", 2)
  if not getattr(sys.modules.get("jax._src.xla_bridge"), "_backends", None):  # not started: can set the count
    simulate_devices(args.devices)
  log = logging.getLogger("ap_xla")
  level, handler = log.level, logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("[ap-xla] %(message)s"))
  if not args.quiet:
    log.addHandler(handler)
    log.setLevel(logging.INFO)
  try:
    return _plan(args)
  except KeyboardInterrupt:  # before or after the search (`_plan` handles one during it)
    print(f"{PROG} plan: interrupted.", file=sys.stderr)
    return 130
  finally:
    log.setLevel(level)
    log.removeHandler(handler)


def simulate_devices(n: int) -> None:
  """Sets the environment so jax's CPU backend, when created, has `n` devices."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported (by `import ap_xla`) but not started: its config read the old value
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def _inputs(args):
  """(spec, program, hardware, options, settings) from the arguments; ValueError if one is bad."""
  from ap_xla import env, presets
  from passes import hardware
  from passes.space import SearchOptions
  spec = presets.resolve_model(args.model)
  program = presets.build_program(spec, args.batch, args.seq)

  def parse(flag, fn, value):
    try:
      return fn(value)
    except ValueError as e:
      raise ValueError(f"{flag}: {e}") from None
  name = args.hardware.strip()
  load = hardware.load_profile if name.endswith(".json") or os.sep in name else hardware.get_profile
  hw = parse("--hardware", load, name)
  capacity = None
  if args.device_memory is not None:
    capacity = parse("--device-memory", hardware.parse_bytes, args.device_memory)
    if capacity <= 0:
      raise ValueError(f"--device-memory {args.device_memory!r} is not valid: expected a positive size such "
                       "as '40GB' or '80GiB'.")
  if args.memory_ratio is not None and not 0 < args.memory_ratio <= 100:
    raise ValueError(f"--memory-ratio must be a percentage in (0, 100], got {args.memory_ratio:g}.")
  options = SearchOptions(pipeline_parallel=args.pipeline_parallel, num_stages=args.num_stages,
                          num_micro_batches=args.num_micro_batches, tensor_parallel=args.tensor_parallel,
                          activation_recomputation=args.activation_recomputation,
                          distribute_parameter=args.distribute_parameter, mixed_precision=args.mixed_precision)
  threads = args.max_threads  # more compiles at once than cores only adds memory (FIELD_NOTES)
  if threads is None and env._get("MAX_PARALLEL_COMPILE_THREADS", os.environ) is None:
    threads = min(16, os.cpu_count() or 1)
  settings = env.read_settings(hardware=hw, capacity_bytes=capacity, memory_ratio=args.memory_ratio,
                               max_threads=threads)
  if settings.measure_top_k:
    var = env._get("MEASURE_TOP_K", os.environ)
    raise ValueError(f"{var[0] if var else 'AP_XLA_MEASURE_TOP_K'}={settings.measure_top_k}: `{PROG} plan` "
                     f"compiles for {hw.name} on simulated CPU devices, so running the candidates would time "
                     "the CPU, not the target; unset it here (measure on the target machine with "
                     "ap_xla.search there).")
  from ap_xla import plan_cache  # read the cache's variables now: a bad one is a usage error, not a traceback
  if not args.no_cache:
    plan_cache.cache_enabled()
  if args.cache_dir is None:
    plan_cache.cache_dir()
  return spec, program, hw, options, settings


class UsageError(ValueError):
  """Arguments that can never give a plan (exit 2); `results` lists what was left out and why."""

  def __init__(self, message: str, results=()):
    super().__init__(message)
    self.results = tuple(results)


def _space(program, n: int, options, tp_rules):
  """(plans, skipped) of `options` on `n` devices, enumerated as `passes.search.search` does.

  Nothing is compiled. Raises ValueError when a pinned option can never be satisfied.
  """
  from passes import pipeline
  from passes.space import enumerate_plans

  def tp_ok(tp):
    rules = tp_rules() if options.tensor_parallel != 1 and n > 1 else None
    return None if rules is not None and rules.shardable(tp) else (
        f"no tensor-parallel group of the program divides by tp={tp}")
  return enumerate_plans(n, program.batch_size, program.num_blocks, options, tp_ok,
                         lambda pp, mb, dp: pipeline.check_pipeline(program.num_blocks, program.batch_size,
                                                                    pp, mb, dp))


def plan_search(program, devices, options, settings, *, directory=None, cache=True):
  """The search `ap-xla plan` runs: `passes.search.search` through the plan cache, the same
  screened search as the one-liner and `ap_xla.search` (`settings.exhaustive` compiles every
  candidate instead).

  Raises:
    UsageError: a pinned option can never be satisfied, or the options leave no candidate for
      this device count and batch (checked before the search; nothing is compiled).
    OutOfMemoryError: no candidate fits in the budget.
  """
  from ap_xla import plan_cache
  from passes.build import derive_program_tp
  from passes.report import SKIPPED, CandidateResult, rank
  from passes.space import no_candidate_message
  n = len(devices)
  rules = functools.cache(lambda: derive_program_tp(program.abstract()))
  try:
    plans, skipped = _space(program, n, options, rules)
  except ValueError as e:  # a pinned option this program, batch or device count cannot satisfy
    raise UsageError(str(e)) from None
  if not plans:
    gone = [CandidateResult(s.plan, SKIPPED, reason=s.reason) for s in skipped]
    header = (f"no parallel plan of these options can use {n} devices with a global batch of "
              f"{program.batch_size}")
    raise UsageError(no_candidate_message(n, program.batch_size, gone, options.pinned(), header), rank(gone))
  return plan_cache.cached_search(program, devices, options, settings, directory=directory,
                                  enabled=None if cache else False)


def _fail(message, code: int) -> int:
  print(f"{PROG} plan: error: {message}", file=sys.stderr)
  return code


def _plan(args) -> int:
  import jax  # after simulate_devices
  from passes.report import NothingCompiledError, OutOfMemoryError
  from passes.search import config_line
  try:
    spec, program, hw, options, settings = _inputs(args)
  except (ValueError, TypeError) as e:  # parsing the arguments, the model config, the environment
    return _fail(e, 2)
  devices = jax.devices("cpu")
  if len(devices) < args.devices:
    return _fail(f"--devices {args.devices} needs {args.devices} simulated devices, but jax was already "
                 f"started with {len(devices)}; run `{PROG} plan` in a process of its own.", 1)
  seq = args.seq or spec.default_seq
  doc = {"model": {"name": spec.name, "family": spec.family, "num_params": program.num_params, "note": spec.note,
                   "config": dataclasses.asdict(dataclasses.replace(spec.config, seq=seq))},
         "batch": args.batch, "seq": seq, "devices": args.devices, "hardware": dataclasses.asdict(hw),
         "options": dataclasses.asdict(options)}
  t0 = time.perf_counter()
  if args.exhaustive:
    settings = dataclasses.replace(settings, exhaustive=True)
  try:
    result = plan_search(program, devices[:args.devices], options, settings, directory=args.cache_dir,
                         cache=not args.no_cache)
  except (UsageError, OutOfMemoryError) as e:  # not any ValueError: one from inside the search is a bug
    usage = isinstance(e, UsageError)
    if args.json:
      doc.update(error="bad_arguments" if usage else "nothing_compiled" if isinstance(e, NothingCompiledError)
                 else "out_of_memory", message=str(e),
                 from_cache=getattr(e, "from_cache", False), candidates=[c.to_json() for c in e.results])
      print(json.dumps(doc, indent=1))
    elif not usage and e.results:  # the reasons "see the reasons in the report" refers to
      print(_candidates_table(e.results, args.top))
    if usage:
      return _fail(e, 2)
    print(str(e), file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"{PROG} plan: interrupted; nothing was stored for the search under way.", file=sys.stderr)
    return 130
  doc.update(elapsed_s=time.perf_counter() - t0, from_cache=result.from_cache, screen=result.screen,
             plan=result.plan.to_dict(), config_line=config_line(result.plan, result.global_batch),
             route=result.route,
             memory_bytes=result.chosen.memory_bytes, est_time_s=result.chosen.est_time_s)
  print(json.dumps(dict(doc, result=result.to_json()), indent=1) if args.json else
        _text_report(spec, program, hw, result, doc, args.top))
  return 0


def _candidates_table(candidates, top) -> str:
  """The candidates of a failed search as the report's table (the chosen plan's fields unused)."""
  from passes.report import SearchResult
  c = candidates[0]
  table = SearchResult(c.plan, tuple(candidates), 0, 0, "", 0, 0, {}).table(limit=top or None)
  more = len(candidates) - top if top and len(candidates) > top else 0
  return table + (f"\n... {more} more candidates (--top 0 lists all)" if more else "")


def _text_report(spec, program, hw, result, doc, top) -> str:
  from passes.report import fmt_bytes, fmt_time
  compiled = sum(c.compiled for c in result.candidates)
  predicted = sum(c.figures == "predicted" for c in result.candidates)
  how = ("read from the plan cache (search skipped)" if result.from_cache else
         f"{len(result.candidates)} candidates: predicted {predicted}, compiled {compiled}, in "
         f"{doc['elapsed_s']:.1f} s")
  lines = [f"Model:    {spec.label} ({spec.family}, {program.num_params / 1e6:,.1f}M parameters), batch "
           f"{program.batch_size} x seq {doc['seq']}" + (f"  [{spec.note}]" if spec.note else ""),
           f"Target:   {result.num_devices} x {hw.name} ({fmt_bytes(result.capacity_bytes)} each; budget "
           f"{fmt_bytes(result.budget_bytes)}), simulated on CPU devices", f"Search:   {how}"]
  if result.route:  # which compiler gave the compiled candidates' figures
    lines.append(f"Compiled: {result.route}")
  scr = result.screen
  if scr.get("samples"):
    lines.append(f"  the screen's largest stated error after {scr['samples']} compiled candidates: memory "
                 f"{100 * scr['memory_error']:.1f}%, time {100 * scr['time_error']:.1f}%")
  lines += ["", result.table(limit=top or None)]
  if top and len(result.candidates) > top:
    lines.append(f"... {len(result.candidates) - top} more candidates (--top 0 lists all)")
  c = result.chosen
  lines += ["", f"Chosen plan: {result.plan}", f"  {doc['config_line']}",
            f"  memory per device: {fmt_bytes(c.memory_bytes)} of {fmt_bytes(result.budget_bytes)} budget "
            f"({100 * c.memory_bytes / result.capacity_bytes:.1f}% of the device); "
            f"estimated step time: {fmt_time(c.est_time_s)}"]
  return "\n".join(lines)
