"""ap-xla: automatic parallelization for training on JAX/XLA.

The public API, picked name by name.
"""
from ap_xla.api import disable_advanced_parallelization, enable_advanced_parallelization, parallelize, search
from ap_xla.flax_adapters import program_from_linen, program_from_nnx
from ap_xla.torch_frontend import (UnsupportedUsageError, load_checkpoint, plan_report, save_checkpoint,
                                   sync_to_torch)
from ap_xla.trainer import Trainer
from passes.plan import Plan
from passes.program import Layers, Program
from passes.report import CandidateResult, OutOfMemoryError, SearchResult
from passes.space import SearchOptions

__all__ = [
    "enable_advanced_parallelization", "disable_advanced_parallelization", "search", "parallelize",
    "Trainer", "Plan", "Program", "Layers", "SearchResult", "CandidateResult", "OutOfMemoryError",
    "SearchOptions", "program_from_linen", "program_from_nnx", "sync_to_torch", "UnsupportedUsageError",
    "save_checkpoint", "load_checkpoint", "plan_report",
]
