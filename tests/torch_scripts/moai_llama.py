"""moreh-dev/quickstart's `moai-example/AP_example.py`, small: LLaMA fine-tuning written for MoAI.

The same loop as the original: `model.cuda()`, pad masks and `position_ids` built from the
attention mask, every input moved with `.cuda()`, `outputs[0]` as the loss, `optim.step()`,
`model.zero_grad(set_to_none=True)`, logging every `--log-interval` steps, then
`model.to("cpu")` and `save_pretrained`. What differs: a tiny Llama built from a config and
a summarization-style dataset generated in code (no hub downloads), torch's AdamW (the
original imported transformers' removed `AdamW`), optional gradient clipping (`--clip`),
`torch.cuda` queries printed at the end, and one JSON line with the losses, gradient norms,
weights and queries. The AP line (`--with-ap`) pins the dimensions the tests do not search.
"""
import copy
import json
import os
from argparse import ArgumentParser

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD = 0


# Compose pad token mask
def create_mask(input_ids, pad_token_id=PAD):
    return (input_ids != pad_token_id).long()


# Mask pad tokens
def mask_pads(inputs, pad_token_id=PAD, ignore_index=-100):
    idx_mask = create_mask(inputs, pad_token_id)
    labels = copy.deepcopy(inputs)
    labels[~idx_mask.bool()] = ignore_index
    return labels


def tokenize(text, block_size, vocab):
    ids = [1 + (b % (vocab - 1)) for b in text.encode()][:block_size]
    return ids + [PAD] * (block_size - len(ids))


def make_dataset(n, block_size, vocab):
    g = torch.Generator().manual_seed(1)
    words = ["the", "model", "plan", "device", "shard", "loss", "step", "batch", "token", "layer"]
    rows = []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        article = " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))
        summary = " ".join(article.split()[: max(1, k // 3)])
        rows.append({"input_ids": torch.tensor(tokenize(f"[SUMMARIZE] {article} [/SUMMARIZE]\n{summary}",
                                                        block_size, vocab))})
    return rows


def parse_args():
    parser = ArgumentParser(description="LLaMA FineTuning")
    parser.add_argument("--num-train-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="train batch size")
    parser.add_argument("--block-size", type=int, default=32, help="max input token length")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-interval", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="stop after this many steps")
    parser.add_argument("--clip", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    parser.add_argument("--save-model-dir", type=str, default="")
    parser.add_argument("--with-ap", action="store_true", help="use automatic parallelization")
    return parser.parse_args()


def main(args):
    # Apply Advanced Parallelization
    if args.with_ap:
        torch.moreh.option.enable_advanced_parallelization(
            mixed_precision=False, pipeline_parallel=False, distribute_parameter=False,
            activation_recomputation=False, num_micro_batches=1)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD)
    model = LlamaForCausalLM(config)

    # Prepare the model for training on Accelerator
    model.cuda()
    model.train()

    dataset = make_dataset(8 * args.batch_size, args.block_size, config.vocab_size)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(2))

    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
    total_step = min(len(train_dataloader) * args.num_train_epochs, args.steps)
    losses, norms = [], []
    step_count = 0
    for epoch in range(args.num_train_epochs):
        for step, batch in enumerate(train_dataloader, start=1):
            input_ids = batch["input_ids"]
            inputs, labels = input_ids, mask_pads(input_ids)
            attn_mask = create_mask(inputs)
            position_ids = attn_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attn_mask == 0, 1)
            outputs = model(
                input_ids.cuda(),
                attention_mask=attn_mask.cuda(),
                labels=labels.cuda(),
                position_ids=position_ids.cuda(),
                use_cache=False,
            )
            loss = outputs[0]
            loss.backward()
            if args.clip:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).item())
            optim.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step_count += 1
            if step % args.log_interval == 0:
                print(f"[Step {step + (epoch * len(train_dataloader))}/{total_step}] Loss: {loss.item()}")
            if step_count >= total_step:
                break

    print("Training Done")
    cuda = {"is_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
            "device_name": torch.cuda.get_device_name(), "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "param_device": str(next(model.parameters()).device)}
    model = model.to("cpu")
    if args.save_model_dir:
        print("Saving Model...")
        model.save_pretrained(args.save_model_dir)
        print(f"Model saved in {args.save_model_dir}")
    weights = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    print(json.dumps({"losses": losses, "norms": norms, "weights": weights, "cuda": cuda}))


if __name__ == "__main__":
    args = parse_args()
    main(args)
