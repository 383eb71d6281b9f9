"""The demo: a Llama-style text-summarization fine-tune with the torch one-liner.

A plain PyTorch training loop (Hugging Face LlamaForCausalLM, torch AdamW) on 8 simulated
devices whose per-device memory (AP_XLA_DEVICE_MEMORY, 48 MiB here) the replicated model and
its optimizer state exceed. With Advanced Parallelization (the default) the candidates and the
chosen configuration are logged and the loss falls; with `--no-ap` the same script runs with a
plain data-parallel plan, as MoAI does without the AP line, and stops with the out-of-memory
error. Data is generated (no downloads) and tokenized byte by byte.

Run: bash scripts/demo.sh [--no-ap] [--steps 15]
"""
from __future__ import annotations

import argparse
import logging
import os
import random

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AP_XLA_DEVICE_MEMORY", "48MiB")

PAD, BOS, EOS = 256, 257, 258
VOCAB = 259

_SUBJECTS = ["The council", "A local bakery", "The research team", "Our rowing club", "The city library",
             "A small startup", "The school board", "The museum"]
_VERBS = ["announced", "opened", "postponed", "celebrated", "funded", "cancelled", "approved", "launched"]
_OBJECTS = ["a new bridge", "its summer festival", "a reading program", "an electric bus line",
            "a robotics contest", "free evening classes", "a community garden", "a jazz night"]
_FILLER = ["Residents gathered early to hear the news.", "Officials said more details will follow.",
           "The plan was debated for several months.", "Volunteers helped prepare the event.",
           "Local media covered the story at length.", "Some critics raised questions about costs."]


def make_example(rng: random.Random) -> tuple[str, str]:
  """An 'article' whose first sentence holds the facts, and its one-line summary."""
  s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
  article = " ".join([f"{s} {v} {o} on {rng.choice(['Monday', 'Friday', 'Sunday'])}."] +
                     rng.sample(_FILLER, 3))
  return article, f"{s} {v} {o}."


def encode(article: str, summary: str, seq: int):
  """Byte-level tokens of 'article TL;DR: summary'; the loss is on the summary only."""
  prompt = [BOS] + list(f"{article}\nTL;DR: ".encode())
  answer = list(summary.encode()) + [EOS]
  ids = (prompt + answer)[:seq]
  labels = ([-100] * len(prompt) + answer)[:seq]
  pad = seq - len(ids)
  return ids + [PAD] * pad, [1] * len(ids) + [0] * pad, labels + [-100] * pad


def batches(batch: int, seq: int, seed: int = 0):
  import torch
  rng = random.Random(seed)
  while True:
    rows = [encode(*make_example(rng), seq) for _ in range(batch)]
    ids, mask, labels = (torch.tensor([r[i] for r in rows]) for i in range(3))
    yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_model(seed: int = 0):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(seed)
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                    pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, attn_implementation="eager",
                    use_cache=False)
  return LlamaForCausalLM(cfg)


def main(argv=None):
  ap = argparse.ArgumentParser(description="Llama summarization fine-tune with ap-xla's one-liner.")
  ap.add_argument("--no-ap", action="store_true", help="run without Advanced Parallelization")
  ap.add_argument("--steps", type=int, default=15)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=192)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--show", type=int, default=8, help="candidates shown after the first step")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
  logging.getLogger("jax").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"

  import torch
  import ap_xla
  from ap_xla import torch_frontend

  if args.no_ap:
    torch_frontend.install(default_plan=True)  # what `ap-xla run` does for a script without the AP line
  else:
    # <- the one line (fp32: bf16 matmuls are emulated and slow on CPU hosts)
    ap_xla.enable_advanced_parallelization(mixed_precision=False)

  model = build_model()
  n = sum(p.numel() for p in model.parameters())
  print(f"model: LlamaForCausalLM, {n:,} parameters ({n * 4 / 2**20:.1f} MiB fp32; with AdamW state "
        f"and gradients {n * 16 / 2**20:.0f} MiB replicated); per-device memory "
        f"{os.environ['AP_XLA_DEVICE_MEMORY']} on 8 simulated devices")
  optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
  data = batches(args.batch, args.seq)
  try:
    for step in range(args.steps):
      batch = next(data)
      loss = model(**batch).loss
      loss.backward()
      optim.step()
      optim.zero_grad()
      print(f"step {step + 1:3d}  loss {loss.item():.4f}")
      if step == 0 and not args.no_ap:
        report = ap_xla.plan_report(model)
        print(f"\nthe search's best candidates (of {len(report.candidates)}; "
              f"ap_xla.plan_report(model).table() lists them all):\n{report.table(limit=args.show)}\n")
  except ap_xla.OutOfMemoryError as e:
    print(f"\n{e}")
    return 1
  model.eval()
  with torch.no_grad():
    out = model(**next(batches(args.batch, args.seq, seed=123)))
    print(f"held-out summary loss (eval, no_grad): {out.loss.item():.4f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
