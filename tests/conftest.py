"""Tests run on 8 simulated CPU devices; the flag must be set before jax is imported."""
import os
import signal
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Searches through the environment (the one-liner, `ap-xla run`, subprocesses) choose by the
# estimate alone, which is deterministic: timing near ties (the default 30 s budget) would let a
# test's choice depend on this host's load. tests/test_measure.py tests the timing.
os.environ.setdefault("AP_XLA_MEASURE_BUDGET", "0")
# Keep test searches out of the user's plan cache (~/.cache/ap_xla).
os.environ.setdefault("AP_XLA_CACHE_DIR", tempfile.mkdtemp(prefix="ap_xla_test_cache_"))

# The Ctrl-C tests send SIGINT to this process. A shell without job control starts background
# commands with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: restore
# the interactive default so the suite behaves the same however it is launched.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same steps (a search, then the chosen plan again; the same plan in
# several checks, notebooks and subprocesses included): XLA's persistent compilation cache
# serves the repeats. One folder per test run, set here in the environment so the xdist
# workers and the subprocesses the tests start share it; never the user's.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ap_xla_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
