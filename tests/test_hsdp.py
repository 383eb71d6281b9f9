"""HSDP plans (FSDP within groups of data ranks, replicated across them) and FSDP's re-gather in
the backward without recomputation. Equivalence: tests/test_step_equivalence.py ('hsdp' cases);
the screen's exact state terms for HSDP: tests/test_screen.py."""
import jax
import optax
import pytest

from ap_xla.models.llama import LlamaConfig, llama_program
from passes import hlo_stats, memory, screen, shardings
from passes.evaluate import compile_plan
from passes.hardware import get_profile
from passes.plan import Plan
from passes.space import SearchOptions, enumerate_plans, hsdp_groups
from tests.models import TINY_LLAMA


def test_plan_fields_and_errors():
  p = Plan(dp=8, fsdp=True, fsdp_group=4)
  assert (p.hsdp, p.shard_degree, p.replicas, p.data_axes) == (True, 4, 2, ("replica", "data"))
  assert p.mesh_shape == {"stage": 1, "replica": 2, "data": 4, "tensor": 1}
  assert Plan.from_dict(p.to_dict()) == p and "fsdp_group=4" in repr(p)
  assert Plan(dp=8, fsdp=True, fsdp_group=8) == Plan(dp=8, fsdp=True)  # one group of all: plain FSDP
  assert Plan.from_dict({k: v for k, v in Plan(dp=2).to_dict().items() if k != "fsdp_group"}) == Plan(dp=2)
  with pytest.raises(ValueError, match="fsdp_group=3 must divide dp=8"):
    Plan(dp=8, fsdp=True, fsdp_group=3)
  with pytest.raises(ValueError, match="needs fsdp=True"):
    Plan(dp=8, fsdp_group=4)
  with pytest.raises(ValueError, match="pipeline"):
    Plan(dp=4, pp=2, fsdp=True, fsdp_group=2)


def test_candidate_space_adds_node_and_dividing_groups():
  groups = hsdp_groups(8, lambda dp: 32 if dp == 96 else dp)
  assert groups(96, 1) == (8, 32) and groups(16, 1) == (8,) and groups(8, 1) == () and groups(16, 2) == (4,)
  plans, _ = enumerate_plans(16, 32, 4, SearchOptions(num_stages=1, num_micro_batches=1, tensor_parallel=1,
                                                      activation_recomputation="none"),
                             fsdp_groups=groups)
  assert {p.fsdp_group for p in plans if p.fsdp} == {0, 8}
  assert not any(p.hsdp for p in plans if not p.fsdp)


def test_regather_keeps_the_attention_o_s():
  """The re-gather keeps what the block keeps without FSDP: the chunked attention's scores are
  recomputed (an outer checkpoint policy saved them, 205.9 MiB against 50.1 MiB here)."""
  cfg = LlamaConfig(vocab=64, dim=64, layers=4, heads=4, ffn=128, seq=1024)
  prog = llama_program(cfg, 8, optimizer=optax.adamw(1e-3), abstract=True)
  fsdp = memory.memory_stats(compile_plan(prog, Plan(dp=8, fsdp=True), jax.devices(), None)).temp
  dp = memory.memory_stats(compile_plan(prog, Plan(dp=8), jax.devices(), None)).temp
  assert fsdp <= 1.05 * dp, (fsdp, dp)


def test_largest_shard_group_divides_every_weight():
  prog = llama_program(TINY_LLAMA, 16, abstract=True)  # dims 32, 64, 16 x 4 layers
  assert shardings.largest_shard_group(prog, 8) == 8
  assert shardings.largest_shard_group(prog, 96) == 32  # 96 = 32 x 3: no dim divides by 96 or 48


def test_fsdp_without_recomputation_gathers_again_in_the_backward():
  """Without recomputation the backward gathers each layer's weights again (PyTorch FSDP's
  reshard_after_forward) instead of keeping all layers' gathered weights from the forward: XLA's
  temporaries stay well under the L layers' gathered weights (which alone are 32 MiB here; 47.7 MiB
  of temporaries were measured when they were kept, 18.7 MiB with the re-gather), every block
  weight is gathered twice per layer, and the screen predicts the compiled peak within 25%."""
  cfg = LlamaConfig(vocab=64, dim=256, layers=8, heads=4, ffn=1024, seq=16)
  prog = llama_program(cfg, 8, optimizer=optax.adamw(1e-3), abstract=True)
  plan = Plan(dp=8, fsdp=True)
  c = compile_plan(prog, plan, jax.devices(), None)
  m = memory.memory_stats(c)
  gathered_all_layers = sum(x.size * 4 for x in jax.tree.leaves(prog.params["blocks"]))
  assert m.temp < 0.75 * gathered_all_layers, (m, gathered_all_layers)
  gathers = sum(c.count for c in hlo_stats.analyze_hlo(c.as_text()).collectives if c.kind == "all-gather")
  leaves = len(jax.tree.leaves(prog.params["blocks"]))
  assert gathers >= 2 * leaves * cfg.layers, gathers  # forward and backward, per leaf and layer
  s = screen.build_screen(prog, jax.devices(), None, [plan])(plan, get_profile("cpu"))
  assert s.memory["gathered_params"] == gathered_all_layers // cfg.layers
  assert 0.75 < s.memory_bytes / memory.memory_stats(c, "cpu").total < 1.25, (s.memory, m)
