"""A plain PyTorch Llama training loop, timed: the torch one-liner against plain torch.

The same script runs both ways:
  ap-xla run benchmarks/oneliner_speed.py --ap        MoAI's AP line turns Advanced
      Parallelization on; the model stays a CPU torch module and every step runs as ap-xla's
      compiled program on the JAX devices (bf16 mixed precision, the AP default).
  python benchmarks/oneliner_speed.py --device cuda --amp     the same loop in plain torch
      on the GPU, with bf16 autocast (the same precision).

A Hugging Face LlamaForCausalLM built from a config (no downloads), torch AdamW, random
tokens (one fixed generator, the same batches both ways). The first step (under AP: bridging,
plan search and compiling) is timed apart; after `--warmup` more steps, `--steps` steps are
timed one by one (each ends with `loss.item()`, as a training loop that logs its loss does).
Prints one line per timed step and, as its last line, one JSON object: tokens/s, steps/s,
first-step seconds, the losses, and under AP the plan and the search's timings.

Run: see scripts/gpu_check.sh, which runs it both ways on the GPU (part 4).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

# name: (vocab, hidden, intermediate, layers, heads, seq, batch)
MODELS = {
    "tiny": (128, 32, 64, 2, 4, 32, 4),           # the dry run's
    "demo": (259, 256, 688, 4, 8, 192, 32),       # the demo's model, 3.3M parameters
    "llama-120m": (32000, 1024, 2816, 4, 16, 1024, 8),  # the GPU check's: 117M parameters
}


def build_model(name: str, attn: str, seed: int = 0):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  vocab, hidden, inter, layers, heads, seq, _ = MODELS[name]
  torch.manual_seed(seed)
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
                    attn_implementation=attn, use_cache=False, tie_word_embeddings=False)
  return LlamaForCausalLM(cfg)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ap", action="store_true", help="add MoAI's AP line (run under `ap-xla run`)")
  ap.add_argument("--model", choices=sorted(MODELS), default="llama-120m")
  ap.add_argument("--attn", default="sdpa", help="HF attention implementation (default sdpa)")
  ap.add_argument("--device", default="cpu", help="torch device of the model (plain torch: cuda)")
  ap.add_argument("--amp", action="store_true", help="plain torch: bf16 autocast on --device")
  ap.add_argument("--steps", type=int, default=20, help="timed steps")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  ap.add_argument("--batch", type=int, default=0, help="global batch (default: the model's)")
  ap.add_argument("--seq", type=int, default=0, help="sequence length (default: the model's)")
  args = ap.parse_args(argv)

  import torch
  if args.ap:
    torch.moreh.option.enable_advanced_parallelization()  # <- the one line (bf16 mixed precision)

  vocab, *_, seq, batch = MODELS[args.model]
  seq, batch = args.seq or seq, args.batch or batch
  t0 = time.perf_counter()
  model = build_model(args.model, args.attn).to(args.device)
  build_s = time.perf_counter() - t0
  optim = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  gen = torch.Generator().manual_seed(1)
  amp = (torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16) if args.amp
         else contextlib.nullcontext())

  def step() -> float:
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
    with amp:
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optim.step()
    optim.zero_grad()
    return loss.item()

  losses, times = [], []
  t0 = time.perf_counter()
  losses.append(step())
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    losses.append(step())
  for i in range(args.steps):
    t0 = time.perf_counter()
    losses.append(step())
    times.append(time.perf_counter() - t0)
    print(f"step {i + 1:3d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:8.2f} ms", flush=True)
  med = statistics.median(times)
  out = {"benchmark": "oneliner_speed", "mode": "ap-xla" if args.ap else "torch", "model": args.model,
         "params": sum(p.numel() for p in model.parameters()), "batch": batch, "seq": seq,
         "attn": args.attn, "device": args.device, "amp": args.amp, "build_s": build_s,
         "first_step_s": first_s, "step_s_median": med, "steps_per_s": 1 / med,
         "tokens_per_s": batch * seq / med, "steps": args.steps, "warmup": args.warmup,
         "losses": losses, "torch": torch.__version__}
  if args.ap:
    import ap_xla
    report = ap_xla.plan_report(model)
    if report is not None:
      out.update(plan=repr(report.plan), search_s=report.timings.get("total"),
                 search_timings=report.timings, candidates=len(report.candidates),
                 feasible=len(report.feasible), hardware=report.hardware, from_cache=report.from_cache)
  elif args.device.startswith("cuda"):
    out.update(gpu=torch.cuda.get_device_name(), peak_bytes=torch.cuda.max_memory_allocated())
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
