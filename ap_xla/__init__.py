"""ap-xla: automatic parallelization for training on JAX/XLA.

The public API, picked name by name. Modules:
  api            `enable_advanced_parallelization` / `disable_...`, and the JAX-native `search`, `parallelize`
  config         the one explicit AP configuration (a leaf: it installs nothing)
  env            the AP_XLA_* / MOREH_ADVANCED_PARALLELIZATION_* environment variables
  plan_cache     search results stored under a fingerprint of what decides them
  trainer        the runtime: a plan's sharded training state and its compiled step
  checkpoint     orbax checkpoints of the whole training state (sharded, atomic, reshardable)
  distributed    one training program across processes
  flax_adapters  `Program`s from flax linen and nnx modules
  presets        models `ap-xla plan` can plan for
  cli            the `ap-xla` command (`plan`, `run`); `__main__`: `python -m ap_xla`
  launcher       `ap-xla run script.py`: MoAI scripts unmodified
  demo           the demo's fine-tune
  models/        flax models with a block stack (Llama, GPT-2)
  torch_frontend/  the torch one-liner (its `__init__` maps its modules)
"""
from ap_xla.api import disable_advanced_parallelization, enable_advanced_parallelization, parallelize, search
from ap_xla.flax_adapters import program_from_linen, program_from_nnx
from ap_xla.torch_frontend import (UnsupportedUsageError, load_checkpoint, plan_report, save_checkpoint,
                                   sync_to_torch)
from ap_xla.trainer import Trainer
from passes.plan import Plan
from passes.program import Layers, Program
from passes.report import CandidateResult, NothingCompiledError, OutOfMemoryError, SearchResult
from passes.space import SearchOptions

__all__ = [
    "enable_advanced_parallelization", "disable_advanced_parallelization", "search", "parallelize",
    "Trainer", "Plan", "Program", "Layers", "SearchResult", "CandidateResult", "OutOfMemoryError",
    "NothingCompiledError", "SearchOptions", "program_from_linen", "program_from_nnx", "sync_to_torch",
    "UnsupportedUsageError", "save_checkpoint", "load_checkpoint", "plan_report",
]
