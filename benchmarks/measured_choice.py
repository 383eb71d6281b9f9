"""How often measured re-ranking makes the same choice: the screened search run R times.

On plan_quality's small Llama (8 simulated CPU devices, the calibrated profile), the screened
search is run `--repeats` times as a user runs it (`--k 0`, the default: the near ties in its
estimate timed on the devices within `measure_budget_s`, `passes.measure.auto_top_k`) or with
`measure_top_k` k (its k best estimates timed in interleaved rounds, the fastest chosen:
`passes.measure.rerank`), each in a fresh
search (the plan cache off) that reuses XLA's persistent compilation cache. Printed per run:
the plan chosen, each finalist's measured median, the seconds measuring took; then how often
each plan was chosen, and as the last line one JSON object. `benchmarks/plan_quality.py`
judges a choice against every plan's measured step time; this shows whether the choice holds
from one run to the next on a noisy host.

Run: .venv/bin/python benchmarks/measured_choice.py [--repeats 3] [--k 0]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ap_xla.models.llama import llama_program  # noqa: E402
from benchmarks.plan_quality import MODELS  # noqa: E402
from passes import calibrate  # noqa: E402
from passes.search import SearchSettings, search  # noqa: E402
from passes.space import SearchOptions  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=sorted(MODELS), default="small")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--k", type=int, default=0, help="measure_top_k (0: the default search, near ties within its budget)")
  args = ap.parse_args()
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ap_xla_measured_choice_"))
  devices = jax.devices()
  profile = calibrate.load_or_calibrate(devices, calibrate.default_profile_path(devices))
  cfg, batch = MODELS[args.model]
  prog = llama_program(cfg, batch, abstract=True)
  options = SearchOptions(mixed_precision=False)
  base = dict(hardware=profile, capacity_bytes=profile.memory_bytes, progress=False, max_threads=2)
  estimated = search(prog, devices, options, SearchSettings(**base, measure_budget_s=0)).plan
  print(f"{prog!r}; profile {profile!r}\nestimate only: {estimated}")
  runs = []
  for i in range(args.repeats):
    t0 = time.perf_counter()
    res = search(prog, devices, options, SearchSettings(**base, measure_top_k=args.k))
    fin = {repr(c.plan): c.details["measured_s"] for c in res.candidates if "measured_s" in c.details}
    runs.append({"chosen": repr(res.plan), "measured_s": fin, "measure_s": res.timings.get("measure"),
                 "search_s": time.perf_counter() - t0})
    print(f"run {i + 1}: chose {res.plan} (search {runs[-1]['search_s']:.1f} s, {len(fin)} timed, measuring "
          f"{runs[-1]['measure_s']:.1f} s)")
    for name, s in sorted(fin.items(), key=lambda x: x[1]):
      print(f"    {name:84} {s * 1e3:8.2f} ms")
  counts = collections.Counter(r["chosen"] for r in runs)
  print("\nchoices: " + "; ".join(f"{n} x{c}" for n, c in counts.most_common()))
  print(json.dumps({"benchmark": "measured_choice", "model": args.model, "k": args.k, "repeats": args.repeats,
                    "estimated_choice": repr(estimated), "choices": dict(counts), "runs": runs}))


if __name__ == "__main__":
  main()
