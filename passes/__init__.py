"""The sharding-search pass: a `Program` in, a ranked report and a `Plan` out (never imports torch).

  program     the training program the pass consumes (`Program`, `Layers`)
  plan        one point of the candidate space (`Plan`)
  space       the candidate space, and why candidates are left out
  staging     which candidates to compile: families, memory-saving variants, branch-and-bound
  shardings   partition specs of a plan on the (stage, data, tensor) mesh
  tp_rules    tensor-parallel rules from the program's dataflow
  pipeline    GPipe over the 'stage' mesh axis
  recompute   activation recomputation policies (none, full, dots, torchtitan's selective ones)
  step        a plan's sharded training step, jitted on its mesh
  evaluate    compiles one candidate from abstract shapes; reads its memory and cost
  memory      per-device memory of a compiled program
  hlo_stats   FLOPs, memory traffic and collectives from the optimized HLO
  hlo_text    the HLO text parser (instructions, computations, shapes, bytes)
  hlo_groups  the replica groups of HLO collectives
  cost_model  estimated step time: compute plus communication
  hardware    hardware profiles (per-device figures)
  calibrate   microbenchmarks of the devices present -> a profile
  measure     measured re-ranking of the best estimates
  report      every candidate with its memory, cost and verdict
  search      the pass: enumerate -> compile -> filter by memory -> rank -> plan
"""
