#!/usr/bin/env bash
# The heavy benchmarks (not part of the test run): installs ./.venv, then runs each benchmark
# on 8 simulated CPU devices. Each prints a table and, as its last line, one JSON object; the
# full outputs are also written to bench-results/<name>.log. Arguments: the names to run
# (default: all of search_time screen_accuracy plan_quality measured_choice bridge_speed plan_cli cpu_dot_scratch
# architectures published_runs slow_tests); slow_tests is the tests marked slow, left out of the default test run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
mkdir -p bench-results
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(search_time screen_accuracy plan_quality measured_choice bridge_speed plan_cli cpu_dot_scratch architectures published_runs slow_tests)
for name in "${names[@]}"; do
  echo "== $name" >&2
  case "$name" in
    slow_tests)  # the tests marked slow (deeper coverage than the default run's)
      cmd=(.venv/bin/python -m pytest -m slow -n 2 --dist loadfile) ;;
    plan_cli)  # the planner for a cluster this machine does not have, timed (goal: <= 20 s)
      cmd=(.venv/bin/python benchmarks/plan_cli.py) ;;
    search_time|screen_accuracy|plan_quality|measured_choice|bridge_speed|cpu_dot_scratch|architectures|published_runs)
      cmd=(.venv/bin/python "benchmarks/$name.py") ;;
    *) echo "unknown benchmark '$name'; known: search_time screen_accuracy plan_quality measured_choice bridge_speed plan_cli cpu_dot_scratch architectures published_runs slow_tests" >&2; exit 2 ;;
  esac
  "${cmd[@]}" 2>&1 | tee "bench-results/$name.log"
done
