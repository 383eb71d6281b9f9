"""The screen's 'scratch' term: on XLA:CPU, the packing memory of the dots it runs as Eigen
contractions, outside its YNNPACK fusions, which the buffer assignment does not hold (the
compiled side charges the same, `passes.memory.cpu_dot_scratch`).

Which dots, from XLA's source (the CPU pipeline of `xla/service/cpu/cpu_compiler.cc`):
YNNPACK takes a dot only when its left operand is contracted on its last dim
(`IsDotSupportedByYnn`, xla/backends/cpu/ynn_support.cc: `lhs_canonical`, row-major operands).
DotDecomposer first puts every dot in that form (a transposed copy of an operand contracted on
its leading dims); then the algebraic simplifier folds `transpose(dot(a, b))` into
`dot(b, a)` where the transpose is the dot's one user. JAX writes a weight gradient as
`transpose(dot_general(dy, x))`, contracting the token dims: folded, its left operand `x` is
contracted on its leading dims, and the dot runs as an Eigen contraction
(`jaxpr_liveness.eigen_dots` finds them in a part's jaxpr). Nothing folds where a collective
sits between the dot and the transpose: GSPMD reduces a gradient over 'data' right at the
dot that contracts the 'data'-sharded tokens. So the weight gradients are Eigen dots where
their reduction over 'data' comes later or never: no data parallelism, gradient accumulation
with replicated weights (the psum after the loop, `passes.step._accumulate_per_data_shard`),
and a pipeline's stages (a manual region summed after its loops); not under plain GSPMD data
parallelism (micro-batches of FSDP included, each reduce-scattered at its dot).

Traced on the small Llama's compiled candidates (`hlo_stats.unfused_dots`: every unfused dot
is a weight gradient, `.../transpose` in its metadata): dp=1 at tp=4/8; dp=2 tp=4 mb=2
(replicated: 8 Eigen dots, FSDP: none); dp=2-4 mb=1 (none); 1F1B dp=1-2 (blocks and post);
GPipe dp=1-2 (the blocks only: post runs on the output scattered over the stages).
"""
from __future__ import annotations

from passes.plan import Plan


def _reduced_at_dot(plan: Plan) -> bool:
  """Whether GSPMD reduces a whole-batch part's weight gradients over 'data' at their dots."""
  return plan.dp > 1 and (plan.mb == 1 or plan.fsdp)


def eigen_scratch(plan: Plan, pre, blk, post, batch_size: int) -> float:
  """Per-device bytes of the largest Eigen packing among the parts' dots that XLA:CPU runs
  outside YNNPACK under `plan` (module doc); 0 unless the parts were traced for 'xla:cpu'.

  Args:
    pre, blk, post: the parts' costs (`screen_profile.PartCost`; blk and post None for a
      program without layers), whose `eigen_scratch` the walker found.
    batch_size: the program's batch (a GPipe's post runs scattered over the stages when the
      local batch divides by them).
  """
  parts = []
  if plan.pp > 1:
    parts.append(blk)  # the stage loops: a manual region, its gradients summed after the loops
    local = batch_size // plan.dp
    if plan.schedule == "1f1b":
      parts.append(post)  # post runs per micro-batch inside the loop
    elif local % plan.pp != 0 and plan.dp == 1:  # not traced: post whole on every stage, no reduction
      parts.append(post)
    if plan.dp == 1:  # not traced (the Llamas' pre has no dot): pre under GSPMD, nothing reduced
      parts.append(pre)
  elif not _reduced_at_dot(plan):
    parts += [pre, blk, post]
  return float(max((max(c.fwd.eigen_scratch, c.bwd.eigen_scratch) for c in parts if c is not None), default=0))
