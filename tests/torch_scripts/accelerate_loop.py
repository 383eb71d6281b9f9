"""A plain accelerate training loop, as accelerate's own examples write it.

`Accelerator()`, `accelerator.prepare(model, optimizer, loader, scheduler)`,
`accelerator.backward(loss)`, `accelerator.clip_grad_norm_` when gradients sync, a warm-up
then linear-decay scheduler, `accelerator.save_state` at the end, and
`accelerator.unwrap_model(model).save_pretrained`. A tiny Llama built from a config and
token batches made in code (no hub downloads). No AP line: under `ap-xla run` it trains
with MoAI's default plan (plain data parallelism over every device). Prints one JSON line
with the losses, gradient norms, learning rates and the saved folders.
"""
import argparse
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import LlamaConfig, LlamaForCausalLM, get_linear_schedule_with_warmup


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows, seq, vocab):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(1, vocab, (rows, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=g)
        self.mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    accelerator = Accelerator()
    set_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(TokenDataset(args.steps * args.batch_size, 16, config.vocab_size),
                                         batch_size=args.batch_size, shuffle=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    model.train()
    losses, norms, lrs = [], [], []
    for batch in loader:
        outputs = model(**batch)
        loss = outputs.loss
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        accelerator.print(f"step {len(losses)} loss {loss.item():.4f}")

    state_dir = os.path.join(args.output_dir, "state")
    accelerator.save_state(state_dir)
    model_dir = os.path.join(args.output_dir, "model")
    accelerator.unwrap_model(model).save_pretrained(model_dir)
    print(json.dumps({"losses": losses, "norms": norms, "lrs": lrs, "state": state_dir, "model": model_dir,
                      "device": str(accelerator.device)}))


if __name__ == "__main__":
    main()
