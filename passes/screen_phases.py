"""The step's memory phases without pipelining, on XLA:CPU (the screen's memory terms there).

The screen's generic assembly (`passes.screen.Screen`) adds each term's largest value; on
XLA:CPU the peak is instead the largest of the backward's and forward's phases, each holding
its own set of residuals, gradients and gathered weights (`phase_peak`).
"""
from __future__ import annotations

from passes.plan import Plan
from passes.program import BLOCKS, POST, PRE
from passes.regather import regathers


def phase_peak(screen, plan: Plan, pre, blk, post, layout) -> tuple[dict, str]:
  """Without pipelining, on XLA:CPU: the step's memory at its largest phase, split into the
  terms (`screen`: the `passes.screen.Screen` whose terms these are).

  The step runs pre, the layers (a loop), post, then the backward: post's, the layers' (a
  loop), pre's. What is live differs by phase, and the peak is the largest phase, not the
  sum of every phase's largest part:
    the forward       the residuals made so far and the layer's or post's forward;
    post's backward   every residual and post's working set;
    the layer loop    the blocks' and pre's residuals (post's are dead), post's gradient,
                      one layer's working set;
    pre's backward    pre's residuals, post's and the blocks' gradients.
  Gradients (XLA:CPU's buffer assignment and live ranges, `benchmarks/memory_peak.py`):
  - XLA zeroes the backward layer loop's stacked block gradients (its carry) and the
    embedding's scatter target (pre's gradient) before the forward: both are live in every
    phase up to the layer loop's end (the small Llama at dp=8, with and without FSDP: made
    before the forward's loop, freed when the backward's loop takes them; the 100M at dp=2
    tp=4 'none': 81 MiB of zeroed stack in post's backward).
  - Under gradient accumulation (mb > 1) the accumulator, one whole set, throughout. Without
    FSDP a micro-batch's gradient has the accumulator's shape and XLA accumulates pre's and
    post's in place: the embedding's scatter-add writes into the accumulator (no zeroed
    target), post's weight gradient is added to it right after post's backward, before the
    layer loop (the small Llama at dp=1 tp=8 mb=8 and dp=2 tp=4 mb=4: the accumulation
    loop's carry and the layer loop's stack, no [vocab, dim] gradient of the micro-batch).
  - Under FSDP a part's gradient is whole over 'data' until its reduction (XLA combines
    post's with pre's, after the loop: post's waits through it); the layer at work holds
    its gathered weights, then, past its last dot, its whole gradient twice (XLA:CPU
    reduces it with an all-reduce: input and output; the backward's peak counts one).
  - Post's backward runs its input gradient's dot before its weight gradient's: at its
    peak the logits' gradient is held three times (in place, and in the layouts of both
    dots) and the head's weight gradient is not made yet. The part's liveness walks its
    kernels in XLA:CPU's BFS order (`passes.jaxpr_liveness.bfs_order`), which runs those
    dots so, and its peak is taken as it is (the small Llama's dp=8 FSDP: +13.0% before
    the BFS order and the zeroed stack, -0.6% with both).
  Gathered weights under FSDP: where the blocks re-gather their weights (`passes.regather`)
  XLA keeps a second copy of the stored block shards in the layout the per-layer gather
  reads (hoisted before the loops); without re-gathering the forward's layer loop reads
  such a copy too, made before it and freed after it (the 100M at dp=2 tp=4 mb=16 'full'
  peaks in the forward's layer loop beside the accumulator, the zeroed stack and that copy,
  40.5 MiB each: -7.9% without the last two, -1.0% with them). With an accumulation loop
  the gathers of pre's and post's weights, loop-invariant, are hoisted out of it and stay
  for the step; without one post's weights are gathered before the forward's layer loop
  and held until post's backward. Traced on XLA:CPU only (other platforms keep the sum of
  the terms: their layer backward's working set, which the phases rely on, is not traced
  against their compiler).

  Returns:
    ({grads, saved_activations, gathered_params, temporaries}: bytes, what the peak is).
  """
  fsdp = plan.fsdp and plan.shard_degree > 1
  trained = lambda part=None, g=False: screen.trained_bytes(plan, layout, part, gathered=g)
  acc = trained() if plan.mb > 1 else 0
  g_pre, g_post, g_stack = trained(PRE, True), trained(POST, True), trained(BLOCKS)
  if plan.mb > 1 and not fsdp:  # accumulated in place (docstring)
    g_pre = g_post = 0
  per_layer = screen.layer_residuals(plan, blk)
  saved_blocks = screen.program.num_blocks * per_layer + blk.saved_invariant + pre.saved + pre.saved_input
  saved_post = post.saved + post.saved_input
  held = 0.0  # FSDP's gathered weights live in every phase
  copy = 0.0  # the re-gathering blocks' second copy of their stored shards (a temporary)
  fwd_copy = 0.0  # FSDP's copy of the stored block shards, through the forward's layer loop
  at_work = 0.0  # FSDP's layer at work: its gathered weights, then its reduction's output
  if fsdp:
    fwd_copy = sum(st for q, st, _, _ in layout if q == BLOCKS)
    if regathers(plan):
      copy = fwd_copy
    if plan.mb > 1:
      held = sum(g for q, _, g, _ in layout if q in (PRE, POST))
    at_work = screen.gathered_params(plan, blk, layout)
  post_regather = sum(g for q, _, g, _ in layout if q == POST) if fsdp and plan.mb == 1 else 0
  cands = [
      (f"post backward: largest {post.bwd.largest[1]}",
       dict(grads=acc + g_pre + g_stack, saved_activations=saved_blocks + saved_post,
            gathered_params=held + post_regather, temporaries=copy + post.bwd.peak_bytes)),
      (f"the layer loop's backward: block {blk.bwd.largest[1]}",
       dict(grads=acc + g_pre + g_post + g_stack, saved_activations=saved_blocks,
            gathered_params=held + at_work, temporaries=copy + blk.bwd.peak_bytes)),
      # a forward's peak includes the residuals it makes (its outputs)
      ("the layer loop's forward",
       dict(grads=acc + g_pre + g_stack, saved_activations=saved_blocks - per_layer,
            gathered_params=held + post_regather + at_work,
            temporaries=max(copy, fwd_copy) + max(blk.fwd.peak_bytes, pre.fwd.peak_bytes))),
      ("post's forward",
       dict(grads=acc + g_pre + g_stack, saved_activations=saved_blocks,
            gathered_params=held + post_regather, temporaries=copy + post.fwd.peak_bytes)),
      (f"pre backward: largest {pre.bwd.largest[1]}",
       dict(grads=acc + g_post + g_stack, saved_activations=pre.saved + pre.saved_input,
            gathered_params=held, temporaries=copy + pre.bwd.peak_bytes)),
  ]
  what, terms = max(cands, key=lambda c: sum(c[1].values()))
  return terms, what
