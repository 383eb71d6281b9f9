"""Fine-tunes a tiny Hugging Face causal LM with a plain torch loop (no ap-xla line).

Run with `python` it is plain torch (the reference); through `ap-xla run` the model trains with
MoAI's default plan, plain data parallelism over every device. Prints one JSON line with the
losses and saves the trained `state_dict` to --out.

    ap-xla run tests/torch_scripts/train_causal_lm.py --arch qwen3 --out /tmp/qwen3.pt
"""
import argparse
import json

import torch

from bridge import testing

parser = argparse.ArgumentParser()
parser.add_argument("--arch", required=True, choices=sorted(testing.CAUSAL_LMS))
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--out", required=True, help="where to torch.save the trained state_dict")
args = parser.parse_args()

model = testing.tiny_causal_lm(args.arch)  # transformers' default attention
optim = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
# Left-padded rows (padded labels -100): query rows that see no key at all.
batches = [testing.lm_batch(8, 16, seed=s) for s in range(3)]
losses = []
for step in range(args.steps):
  batch = {k: v for k, v in batches[step % len(batches)].items() if k != "use_cache"}
  loss = model(**batch).loss
  loss.backward()
  optim.step()
  optim.zero_grad()
  losses.append(loss.item())
torch.save(model.state_dict(), args.out)
print(json.dumps({"arch": args.arch, "losses": losses}))
