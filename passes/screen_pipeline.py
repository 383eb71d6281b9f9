"""A pipelined step's memory terms (GPipe and 1F1B): what the screen charges a stage.

The screen (`passes.screen.Screen`) hands a pipelined plan's memory here (`pipeline_memory`):
the stage's gradient accumulators (`grads`), its stash of residuals (`saved_activations`), its
gathered weights under FSDP (`gathered_params`) and the working set beside them
(`temporaries`), each read from the plan, the parts' traced profiles and the parameter layout.
The peak is the largest of the step's phases, as XLA schedules them:
  GPipe   its entry (before the forward loop: the stash and gradient accumulators made, the
          stage's gathers; `_gpipe_entry`), pre's and post's phases between and after the
          loops (`_gpipe_edges`), the loops' (`_gpipe_temporaries`);
  1F1B    a tick: post's phase or the stage backward's with a layer loop, both interleaved
          without one (`_1f1b_temporaries`), pre outside the ticks.
Every platform gets the generic terms (GPU targets included: `passes.gpu_target`); the phase
rules marked XLA:CPU were traced on its buffer assignment with `benchmarks/memory_peak.py`
and apply only where the screen's devices are CPUs.
"""
from __future__ import annotations

import jax

from passes import shardings as sh
from passes.plan import DATA, TENSOR, Plan
from passes.program import BLOCKS, POST, PRE
from passes.screen_time import nbytes


def pipeline_shape(plan: Plan) -> tuple[int, int]:
  """(ticks, micro-batches whose residuals a stage keeps at once) of a pipelined plan:
  GPipe in SPMD runs M + S - 1 ticks and keeps every tick's residuals; 1F1B runs
  M + 2S - 1 ticks, each with a forward and a backward, and keeps its ring of 2S residual
  sets (`passes.pipeline_1f1b.ring_slots`; `saved_activations` adds the set a tick's
  backward reads out of it)."""
  S, M = plan.pp, plan.mb
  if plan.schedule == "1f1b":
    return M + 2 * S - 1, 2 * S
  return M + S - 1, M + S - 1


def layer_loop(screen, plan: Plan) -> bool:
  """Whether a pipeline stage runs its blocks as a loop (more than one layer a stage)."""
  return plan.pp > 1 and screen.program.num_blocks // plan.pp > 1


def pipeline_memory(screen, plan: Plan, pre, blk, post, state: dict, layout) -> tuple[dict, str]:
  """A pipelined plan's memory terms beyond the training state (`screen`: the
  `passes.screen.Screen` whose terms these are).

  Returns:
    ({grads, saved_activations, gathered_params, temporaries}: bytes, what the largest
    temporary is).

  Raises:
    ValueError: the program has no layers to stage.
  """
  if blk is None:
    raise ValueError(f"screen_pipeline: {plan!r} pipelines a program without layers "
                     "(Program.layers is None); only a layered program has stages")
  if plan.schedule == "1f1b" and screen.platform == "cpu" and layer_loop(screen, plan):
    saved, temp, what = _1f1b_tick_phases(screen, plan, pre, blk, post)
  else:
    temp, what = temporaries(screen, plan, pre, blk, post, layout)
    saved = saved_activations(screen, plan, pre, blk, post)
  terms = dict(grads=grads(screen, plan, state, layout), saved_activations=saved,
               gathered_params=gathered_params(plan, layout), temporaries=temp)
  if plan.schedule == "gpipe" and screen.platform == "cpu":
    entry = _gpipe_entry(screen, plan, pre, blk, terms["grads"], layout)
    if entry is not None and sum(entry.values()) > sum(terms.values()):
      return entry, "the stage's weights gathered whole over 'tensor', before the forward loop"
  return terms, what


def grads(screen, plan: Plan, state: dict, layout) -> float:
  """Every trained parameter's gradient accumulates through the loops whole (as gathered
  over 'data' under FSDP: reduce-scattered once, after them; the embedding's too).
  When a stage's backward is a loop over its layers, each tick's block gradients are
  that loop's stacked output, beside the accumulator they are added to: a second
  whole set of the stage's. XLA:CPU's buffer assignment, loop-carried values included
  (`benchmarks/memory_peak.py`): GPipe and 1F1B, with and without FSDP, 1-6 layers a
  stage, on three Llamas. With one layer a stage XLA removes that loop."""
  whole = screen.trained_bytes(plan, layout, gathered=True)
  return whole + (screen.trained_bytes(plan, layout, BLOCKS, gathered=True) if layer_loop(screen, plan) else 0)


def saved_activations(screen, plan: Plan, pre, blk, post) -> float:
  """Residuals kept for the backward: per layer x a stage's layers x micro-batches in flight,
  plus the edges' (pre's and post's; under 1F1B the micro-batches' stage inputs and their
  gradients)."""
  per_layer = screen.layer_residuals(plan, blk)
  layers = screen.program.num_blocks // plan.pp
  in_flight = pipeline_shape(plan)[1]
  if layer_loop(screen, plan):
    # The set a tick's backward reads out of the stash is copied: the stage's backward is
    # a loop over its layers, whose operand is a dynamic slice of the stash (1F1B: of the
    # ring the same tick updates in place). XLA:CPU's live ranges: the 100M Llama's 1F1B
    # at tp=4, a ring of 4 x 469 MiB and a 474 MiB copy; its GPipe at tp=4, a stash of
    # 216 MiB and a 72 MiB copy. With one layer a stage XLA removes that loop and reads
    # the stash in place (measured: no copy). Under 1F1B the tick's forward is a loop
    # too, whose stacked residuals are its output, live beside the ring until they are
    # written into it: a third set where nothing tells the phases apart (other platforms).
    # On XLA:CPU the tick's phases are read one by one (`_1f1b_tick_phases`).
    in_flight += 2 if plan.schedule == "1f1b" else 1
  edges = pre.saved + pre.saved_input + post.saved + post.saved_input
  if plan.schedule == "1f1b":  # the micro-batches' inputs and their gradients
    edges += 2 * plan.mb * screen._hidden_bytes(plan)
    if layer_loop(screen, plan):  # post's residuals: within a tick, in its phase (`_1f1b_temporaries`)
      edges -= post.saved + post.saved_input
  return in_flight * layers * per_layer + blk.saved_invariant + edges


def gathered_params(plan: Plan, layout) -> float:
  """Under FSDP, a pipeline stage's block weights as its loops use them (gathered once per
  step), and post's, which runs on every tick (1F1B) or between the loops (GPipe)."""
  if not plan.fsdp or plan.shard_degree == 1:
    return 0.0
  return sum(g for part, _, g, _ in layout if part in (BLOCKS, POST))


def temporaries(screen, plan: Plan, pre, blk, post, layout) -> tuple[float, str]:
  """The working set beside the stash and the gradient accumulators, and what it is: per
  schedule, `_1f1b_temporaries` or `_gpipe_temporaries`."""
  if plan.schedule == "1f1b":
    return _1f1b_temporaries(screen, plan, pre, blk, post)
  # GPipe runs post once, between its loops: its backward's outputs include its weights'
  # gradient, which `grads` already counts (every trained parameter's accumulates whole),
  # so at post's peak that gradient is one buffer, not two (XLA:CPU: `_gpipe_edges`).
  post_grad = screen.trainable_bytes(plan, POST, gathered=True)
  best, what = 0.0, ""
  edges = _gpipe_edges(screen, plan, pre, post, post_grad) if screen.platform == "cpu" else \
      [(name, phase, jc, jc.peak_bytes - (post_grad if c is post and jc is c.bwd else 0))
       for name, c in (("pre", pre), ("post", post)) for phase, jc in (("forward", c.fwd), ("backward", c.bwd))]
  for name, phase, jc, peak in edges:
    if peak > best:
      best, what = peak, f"{name} {phase}: largest {jc.largest[1]}"
  return _gpipe_temporaries(screen, plan, blk, post, layout, best, what)


def _gpipe_edges(screen, plan: Plan, pre, post, post_grad: float) -> list:
  """GPipe's pre and post phases on XLA:CPU: [(part, phase, its jaxpr cost, bytes beyond the
  whole terms)]; the whole terms count every gradient, the stash and every part's residuals.

  Post runs once, between the loops, and its weights' gradient is made only by its
  backward (not live before). Its forward's peak holds the residuals it makes (counted
  whole). Its backward peaks holding the logits' gradient three times (made and padded,
  transposed for the head's weight-gradient dot; each its backward's largest value, as
  `_post_in_tick`), its logits residual dead (as large as that gradient), the gradient of its
  input twice (the head's and the norm's backward) and its weight gradient not made yet.
  Through both the loops' [M, micro-batch, ...] buffer, zeroed before the forward loop and
  carried into the backward one, is live. Pre's backward (after the backward loop) makes its
  gradient, which the whole terms count, and post's residuals are dead by then. XLA:CPU's
  buffer assignment: the small Llama at dp=4 pp=2 mb=2 (post's backward: three f32[1,128,4096],
  the embedding's and the block's gradients, f32[2,1,128,128]) and the 100M at dp=1 tp=4
  pp=2 mb=16 (three f32[16,256,2048], four f32[16,256,768] with the normed input, a 24 MiB
  f32[16,2,256,768])."""
  h = plan.mb * screen._hidden_bytes(plan)
  largest = post.bwd.largest[0]
  g_pre = screen.trainable_bytes(plan, PRE, gathered=True)
  return [("pre", "forward", pre.fwd, pre.fwd.peak_bytes - post_grad),
          ("pre", "backward", pre.bwd, pre.bwd.peak_bytes - g_pre - post.saved - post.saved_input),
          ("post", "forward", post.fwd, post.fwd.peak_bytes - post.saved - post_grad + h),
          ("post", "backward", post.bwd,
           3 * largest - min(post.saved, largest) + 2 * post.saved_input - post_grad + h)]


def _post_in_tick(screen, post) -> float:
  """Post's working set in a 1F1B tick without a layer loop, beyond what `saved_activations`
  counts (its residuals among it).

  On XLA:CPU post's backward peaks holding the logits' gradient three times (as made and
  padded, and transposed for the head's weight-gradient dot; each the largest value of its
  backward), its residuals dead (read once, where the gradient is made); its forward's peak
  holds the residuals it makes, which `saved_activations` counts. XLA:CPU's buffer
  assignment of the small Llama, 1F1B at pp=2: dp=2 tp=2 mb=4 'full' (three f32[128,2048],
  the logits' f32[1,128,2048] residual dead) and dp=1 tp=4 mb=4 'none' (three f32[2,128,1024]
  beside the ring). The jaxpr's own backward peak (`post.bwd.peak_bytes`) holds the gradient
  twice and the head's weight gradient, which XLA makes after the copies are freed. Other
  platforms: the jaxpr's peaks."""
  if screen.platform != "cpu":
    return max(post.fwd.peak_bytes, post.bwd.peak_bytes)
  return max(post.fwd.peak_bytes, 3 * post.bwd.largest[0]) - post.saved


def _1f1b_temporaries(screen, plan: Plan, pre, blk, post) -> tuple[float, str]:
  """1F1B's working set beside its ring (`saved_activations`); pre runs once, outside the
  ticks. A tick runs its forward, post (per micro-batch, on the last stage) and its
  backward. With more than one layer a stage the backward is a loop, which XLA schedules
  nothing across: the peak is post's phase (its residuals and backward) or the loop's (with
  the set it copies out of the ring, which post's phase does not hold yet), not their sum
  (XLA:CPU's buffer assignment, the 100M Llama at pp=4 mb=8: the peak in the stage
  backward, post's buffers dead but its logits: the head's dot runs before the loop, the rest
  of post after it). With one layer a stage there is no loop and XLA
  interleaves post's backward with the block's: their working sets add up (the small
  Llama at pp=2: the logits' gradient and the attention scores live at once). On XLA:CPU
  the layer loop's phases are `_1f1b_tick_phases`."""
  outside = max(pre.fwd.peak_bytes, pre.bwd.peak_bytes)
  if not layer_loop(screen, plan):
    return max(outside, _post_in_tick(screen, post) + blk.temp_peak), \
        f"post and the block, interleaved in the ticks: block {blk.bwd.largest[1]}"
  copy = screen.program.num_blocks // plan.pp * (blk.saved + blk.saved_input)
  post_phase = max(post.fwd.peak_bytes, post.bwd.peak_bytes + post.saved + post.saved_input) - copy
  best = max((post_phase, f"post in the ticks: largest {post.bwd.largest[1]}"),
             (blk.temp_peak, f"the stage backward in the ticks: block {blk.bwd.largest[1]}"),
             (outside, f"pre, outside the ticks: largest {pre.bwd.largest[1]}"))
  return max(best[0], 0.0), best[1]


def _1f1b_tick_phases(screen, plan: Plan, pre, blk, post) -> tuple[float, float, str]:
  """1F1B's peak on XLA:CPU with a layer loop a stage: (the residuals and stage inputs kept,
  the working set beside them, what it is) in the phase that holds the most.

  A tick's forward and backward are each a loop over the stage's layers, which XLA
  schedules nothing across. Beside the ring of 2S residual sets (`ring_slots`) and the
  micro-batches' stage inputs and their gradients ([M, micro-batch, ...] each), the phases
  hold (XLA:CPU's buffer assignment and the values' name stacks, `benchmarks/memory_peak.py`:
  the 100M Llama at dp=1 tp=4 pp=2 mb=4, 'none', 'selective_op' and 'full', and the GQA
  Llama at the same plan, 'selective_op', and at dp=2 tp=2 pp=2 mb=8 'full' with FSDP):
    forward   the forward's stack of the micro-batch's residuals (the layer loop's output,
              [layers, ...]), written into its ring slot in place after the loop (an idle
              tick's write is dropped, `passes.pipeline_1f1b`): one set beyond the ring;
              the layer loop's working set, and three hidden-sized tick values: the stage's
              input (selected between the batch and what the previous stage sent), the
              carried cotangent (copied: the tick overwrites it) and the slot of the input
              gradients the tick's backward updates.
    backward  the set the backward reads out of the ring (copied: one set beyond the ring;
              the forward's stack is in the ring by then); the block backward's working
              set; post's residuals (the head's dot and the norm before it run before the
              stage backward loop and the rest of post after it, so its logits, its normed
              input and its input live across the loop) and four hidden-sized values: post's
              normed input a second time (XLA fuses its multiply into the head's dot operand
              and into the residual separately), the stage output sent to the next stage,
              the carried cotangent's copy and the input gradients' slot. The 100M 'none'
              (4 ring slots and the copy of 252 MiB each), 'selective_op' and 'full', and
              GQA's 'selective_op', peak here.
    post      between the loops, its residuals and backward beside the ring and one set.
    outside   pre, before the ticks (the ring made) and after them (the ring dead).
  Replayed on every 1F1B candidate of four Llamas (`benchmarks/screen_replay.py`): the 100M's
  within 3.3% (up to +5.7% before), the small's within 4.2%, the held-out six-head model's
  within 4.2%. The loss's logits-sized slice (`ap_xla.models.decoder.next_token_loss`'s
  `logits[:, :-1]`) is live across the stage backward loop in some plans and not in others
  (XLA:CPU's BFS scheduler orders two ready instructions), which the plan does not tell:
  not counted (GQA's dp=2 tp=2 pp=2 mb=8 'full' FSDP, -7.2%)."""
  h = screen._hidden_bytes(plan)
  one_set = screen.program.num_blocks // plan.pp * screen.layer_residuals(plan, blk)
  ring = pipeline_shape(plan)[1] * one_set + blk.saved_invariant + pre.saved + pre.saved_input \
      + 2 * plan.mb * h  # the micro-batches' stage inputs and their gradients
  post_phase = max(post.fwd.peak_bytes, post.bwd.peak_bytes + post.saved + post.saved_input)
  outside = max(pre.fwd.peak_bytes, pre.bwd.peak_bytes)
  phases = [(ring + one_set, blk.fwd.peak_bytes + 3 * h, f"the stage forward in the ticks: block {blk.fwd.largest[1]}"),
            (ring + one_set, blk.bwd.peak_bytes + post.saved + post.saved_input + 4 * h,
             f"the stage backward in the ticks: block {blk.bwd.largest[1]}"),
            (ring + one_set, post_phase, f"post in the ticks: largest {post.bwd.largest[1]}"),
            (ring, outside, f"pre, outside the ticks: largest {pre.bwd.largest[1]}")]
  return max(phases, key=lambda x: x[0] + x[1])


def _gpipe_temporaries(screen, plan: Plan, blk, post, layout, edge: float, what: str) -> tuple[float, str]:
  """GPipe's temporaries beside its stash and gradient accumulators. GPipe runs post
  between its forward and backward loops: the peak is either post's working set (`edge`,
  what it is: `what`) or the loops' (the blocks' per micro-batch, the micro-batches' stage
  inputs and their gradients, and with a layer loop the copied residual set and the tick's
  gradient stack that `saved_activations` and `grads` count), never both (XLA:CPU's buffer
  assignment: the small Llama's GPipe peaks in post, the 100M's in the backward loop)."""
  loops = blk.temp_peak
  # post's residuals, which `saved_activations` counts, are freed by post's backward,
  # before the backward loop
  loops += 2 * plan.mb * screen._hidden_bytes(plan) - post.saved - post.saved_input
  if screen.platform == "cpu" and plan.fsdp and plan.shard_degree > 1:
    # Under FSDP post's gathered weights are freed after its backward and its gradient is
    # reduce-scattered there, before the backward loop: a shard of it stays, not the whole
    # (XLA:CPU's buffer assignment, the 100M's GPipe at dp=2 tp=1 pp=4 mb=8 and dp=2 tp=2 pp=2
    # mb=16: in the backward loop only pre's gradient of the edges' buffers is live)
    stored, gathered = (sum(x[i] for q, *x in layout if q == POST) for i in (0, 1))
    loops -= gathered + screen.trainable_bytes(plan, POST, gathered=True) - stored
  counted = 0.0  # the loops' own terms, counted in saved_activations and grads
  if layer_loop(screen, plan):
    per_layer = screen.layer_residuals(plan, blk)
    counted = (screen.program.num_blocks // plan.pp * per_layer
               + sum(g for part, _, g, _ in layout if part == BLOCKS))
  if edge - counted >= loops:
    return edge - counted, what
  return loops, f"the stage loops: block {blk.bwd.largest[1]} per micro-batch"


def _gpipe_entry(screen, plan: Plan, pre, blk, grads_bytes: float, layout) -> dict | None:
  """GPipe's memory as its forward loop starts, under FSDP with tensor parallelism (None
  otherwise): the stage's gathers there pass through whole weights.

  A block weight sharded over 'data' (FSDP) and 'tensor' is gathered over 'data' inside the
  pipeline's manual region, where 'tensor' is automatic: XLA's SPMD partitioner replicates
  the weight over 'tensor' (an all-gather over the tensor groups), gathers it over 'data',
  then slices its tensor shard back out. XLA:CPU's scheduler issues the stage's gathers
  together, before their slices: every such weight of the stage is live whole (tp times its
  gathered bytes) at once, the first slice beside them (the peak is at that slice: the
  largest weight's tensor shard), and what is already made for the loops: the stash and the
  block gradient accumulators (zero-initialised up front; `grads` less post's gradient, not
  made yet), pre's gradient, post's gathered weights, pre's gathered table (the embedding's
  forward is scheduled among the gathers), the micro-batches' stage inputs and outputs and
  the ticks' carry. XLA:CPU's buffer assignment of the 100M Llama at dp=2 tp=2 pp=2 with
  FSDP, mb 4, 8 and 16: its peak, 500, 488 and 482 MiB of temporaries, each this sum within
  1% (162 MiB of whole weights, a stage gathered over 'data' being 81); the loops' peak 30
  to 100 MiB below it. Without tensor parallelism the gathers keep the gathered shape and
  the loops' phase is the larger.
  """
  if not plan.fsdp or plan.shard_degree == 1 or plan.tp == 1:
    return None
  mesh = plan.mesh_shape
  pspecs, _ = screen._specs(plan)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  whole = first_slice = 0.0
  for x, spec in zip(jax.tree.leaves(screen.program.params[BLOCKS]), jax.tree.leaves(pspecs[BLOCKS], is_leaf=is_spec)):
    gathered = sh.without_axis(spec, DATA)
    n = nbytes(x) // sh.num_shards(gathered, mesh)
    if gathered != spec and sh.without_axis(gathered, TENSOR) != gathered:
      whole += nbytes(x) // sh.num_shards(sh.without_axis(gathered, TENSOR), mesh)
      first_slice = max(first_slice, n)
    else:
      whole += n
  per_layer = screen.layer_residuals(plan, blk)
  stash = pipeline_shape(plan)[1] * screen.program.num_blocks // plan.pp * per_layer
  g_post = screen.trainable_bytes(plan, POST, gathered=True)
  h = screen._hidden_bytes(plan)
  edge_weights = sum(g for part, _, g, _ in layout if part in (PRE, POST))
  return dict(grads=grads_bytes - g_post, saved_activations=stash + blk.saved_invariant + pre.saved + pre.saved_input,
              gathered_params=whole + first_slice + edge_weights, temporaries=2 * plan.mb * h + 2 * h)

