"""What XLA keeps live at a candidate's memory peak, beside the screen's memory terms.

Compiles one plan of a Llama configuration on 8 simulated CPU devices with XLA's dumps on,
reads the step's buffer assignment and live ranges (`*-buffer-assignment.txt`,
`*-live-range.txt`) and prints: the compiled figures (`passes.memory.memory_stats`: buffer
assignment, the CPU dot scratch), the temporaries' allocation beside the most of its bytes
live at once (loop-carried values included, `live_at_peak`), the screen's terms
(`passes.screen`) and the largest buffers live at that peak, each with the JAX name stack
it was made under (`origins`: which loop and op of the step). This is how the screen's
pipeline terms were traced (benchmarks/RESULTS.md, "Screen accuracy").

Run: .venv/bin/python benchmarks/memory_peak.py --plan "Plan(dp=1, tp=4, pp=2, mb=4, schedule='1f1b')"
     [--config "LlamaConfig(vocab=8192, dim=768, layers=12, heads=12, ffn=2048, seq=256)" --batch 32]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="ap_xla_memory_peak_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
                           + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ap_xla.models.llama import LlamaConfig, llama_program  # noqa: E402
from passes import build, hlo_stats, memory, screen  # noqa: E402
from passes.evaluate import compile_plan  # noqa: E402
from passes.hardware import get_profile  # noqa: E402
from passes.plan import Plan  # noqa: E402

from benchmarks import heap_gap  # noqa: E402

MiB = 2**20


def live_at_peak(dump: str) -> tuple[int, int, list[tuple[int, str]]]:
  """(bytes of the temp allocation, the most of its bytes live at once, [(bytes, buffer
  (shape))] live then, largest first) of the step.

  Over the buffer assignment's values with their live ranges, loop-carried ones (XLA's phi
  values of a while loop's tuple) included: the live-range report's own "(peak)" leaves
  those out, which made pipelines look like the heap packed badly around their loops (it
  does not: the temp allocation is within 1% of this peak on the plans traced; where it is
  not, `benchmarks/heap_gap.py` shows why)."""
  total, values = heap_gap.temp_values(dump)
  best, when = -1, 0
  for t in sorted({r[0] for _, _, r, _ in values}):  # the union of the intervals live at t
    live, _ = heap_gap._live(values, t)
    if live > best:
      best, when = live, t
  rows = sorted(((s, what) for _, s, (a, b), what in values if a <= when <= b), reverse=True)
  return total, best, rows


def origins(dump: str) -> dict[str, str]:
  """{instruction: the JAX name stack it was made under} of the step's optimised HLO: where a
  buffer at the peak comes from (`shard_map/while/body/...` is the pipeline's tick loop,
  `.../transpose(jvp())/while/body/...` the stage backward's layer loop inside it,
  `.../jvp()/while/body/...` the stage forward's); empty for parameters and copies."""
  files = sorted(glob.glob(f"{dump}/*jit_step*cpu_after_optimizations.txt"))
  if not files:
    return {}
  text = open(files[-1]).read()
  return {m.group(1): m.group(2).removeprefix("jit(step)/") for m in re.finditer(
      r'^\s+(?:ROOT )?%(\S+) = [^\n]*?op_name="([^"]*)"', text, re.M)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--plan", required=True, help="a Plan(...) expression")
  ap.add_argument("--config", default="LlamaConfig(vocab=4096, dim=128, layers=2, heads=8, ffn=512, seq=128)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--top", type=int, default=15)
  ap.add_argument("--keep", action="store_true", help="keep XLA's dumps (the directory is printed)")
  args = ap.parse_args()
  plan = eval(args.plan, {"Plan": Plan})  # noqa: S307 (a developer's command line)
  cfg = eval(args.config, {"LlamaConfig": LlamaConfig})  # noqa: S307
  prog = llama_program(cfg, args.batch, abstract=True)
  rules = build.derive_program_tp(prog)
  screened = screen.build_screen(prog, jax.devices(), rules, [plan])(plan, get_profile("cpu"))
  compiled = compile_plan(prog, plan, jax.devices(), build.tp_dims(prog, rules, plan.tp))
  mem = memory.memory_stats(compiled, "cpu", hlo_stats.analyze_hlo(compiled.as_text()))
  temp, peak, rows = live_at_peak(DUMP)
  made = origins(DUMP)
  if args.keep:
    print(f"  XLA's dumps: {DUMP}")
  else:
    shutil.rmtree(DUMP, ignore_errors=True)
  print(f"{plan!r} of {cfg}, batch {args.batch}")
  print(f"  compiled   {mem.total / MiB:10.2f} MiB  (buffer assignment {(mem.total - mem.scratch) / MiB:.2f}, "
        f"dot scratch {mem.scratch / MiB:.2f})")
  print(f"  temp       {temp / MiB:10.2f} MiB  (the buffer assignment's temporaries; live at once at most "
        f"{peak / MiB:.2f}, loop-carried buffers included)")
  print(f"  screen     {screened.memory_bytes / MiB:10.2f} MiB  ({screened.memory_bytes / mem.total - 1:+.1%}): "
        + ", ".join(f"{k} {v / MiB:.2f}" for k, v in screened.memory.items()))
  print(f"  largest buffers live at the peak:")
  for b, what in rows[:args.top]:
    stack = made.get(what.split("{")[0], "")
    stack = stack if len(stack) <= 96 else f"{stack[:44]}...{stack[-49:]}"  # the loop it is in ... the op
    print(f"    {b / MiB:9.2f} MiB  {what[:76]:76}  {stack}")
  print(json.dumps({"benchmark": "memory_peak", "plan": repr(plan), "config": repr(cfg), "batch": args.batch,
                    "compiled_bytes": mem.total, "scratch_bytes": mem.scratch, "temp_bytes": temp,
                    "live_peak_temp_bytes": peak,
                    "screen_bytes": screened.memory_bytes, "screen_terms": screened.memory}))


if __name__ == "__main__":
  main()
