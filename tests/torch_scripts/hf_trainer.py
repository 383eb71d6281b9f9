"""moreh-dev/quickstart's `train_llm.py`, small: a causal LM fine-tuned with the HF Trainer.

As in the original: `import moreh` then MoAI's AP line (a warning when the import fails, as
in plain torch), transformers' info logging, a dataset whose rows hold `input_ids`, `labels`
and `position_ids`, a train / validation split (train[5%:] / train[:5%]), and
`TrainingArguments(optim='adamw_torch', lr_scheduler_type='cosine', warmup_steps,
eval_strategy='epoch', logging_steps, logging_first_step, report_to='none',
logging_nan_inf_filter=False, max_grad_norm=1)` with `Trainer(model, args, train_dataset,
eval_dataset).train()`. What differs: a tiny Qwen2 built from a config and a dataset made
in code with `datasets` (no hub downloads), padding labelled -100 (so the labelled tokens
differ per batch and `num_items_in_batch` matters), `--default` for default
`TrainingArguments` (logging every step, so there are losses to compare), gradient
accumulation, checkpoints, a resume and LoRA adapters (peft, `--lora`) from the command line,
`save_model` at the end (the adapter alone under `--lora`), and
one JSON line with the log history and the saved weights' folder. The AP line pins the
dimensions the tests do not search.
"""
import argparse
import json
import os

import datasets
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

PAD = 0


def arg_parse():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output-dir", type=str, required=True)
    parser.add_argument("--num-epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--log-interval", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint folder to resume from")
    parser.add_argument("--rows", type=int, default=70)
    parser.add_argument("--default", action="store_true", help="default TrainingArguments")
    parser.add_argument("--lora", action="store_true",
                        help="fine-tune LoRA adapters on q_proj, v_proj (Moreh's recipe's --lora)")
    return parser.parse_args()


def build_dataset(rows, seq, vocab):
    g = torch.Generator().manual_seed(3)
    ids, labels, positions = [], [], []
    for _ in range(rows):
        n = int(torch.randint(seq // 3, seq + 1, (1,), generator=g))
        tokens = torch.randint(1, vocab, (n,), generator=g).tolist()
        ids.append(tokens + [PAD] * (seq - n))
        labels.append(tokens + [-100] * (seq - n))
        positions.append(list(range(seq)))
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "position_ids": positions})


def main(args):
    try:
        import moreh  # noqa: F401  (MoAI's driver; `ap-xla run` provides it)
        torch.moreh.option.enable_advanced_parallelization(
            mixed_precision=False, pipeline_parallel=False, distribute_parameter=False,
            activation_recomputation=False)
    except ImportError:
        print("Cannot use Moreh Driver")

    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_info()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    if args.lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))

    full = build_dataset(args.rows, args.sequence_length, config.vocab_size).with_format("torch")
    cut = len(full) // 20 * 2  # the validation split, as train[:5%] (x2: enough rows for a batch)
    dataset = {"train": full.select(range(cut, len(full))), "validation": full.select(range(cut))}

    save = dict(save_strategy="steps", save_steps=args.save_steps) if args.save_steps else dict(save_strategy="no")
    if args.default:
        trainer_config = TrainingArguments(output_dir=args.output_dir, report_to="none", logging_steps=1,
                                           num_train_epochs=args.num_epochs,
                                           per_device_train_batch_size=args.train_batch_size, **save)
    else:
        trainer_config = TrainingArguments(
            num_train_epochs=args.num_epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.train_batch_size,
            per_device_eval_batch_size=args.eval_batch_size,
            output_dir=args.output_dir,
            optim="adamw_torch",
            lr_scheduler_type="cosine",
            learning_rate=args.lr,
            warmup_steps=args.warmup_steps,
            gradient_accumulation_steps=args.grad_accum,
            do_eval=True,
            eval_strategy="epoch",
            logging_steps=args.log_interval,
            logging_first_step=True,
            report_to="none",
            logging_nan_inf_filter=False,
            max_grad_norm=1,
            **save)

    trainer = Trainer(model, args=trainer_config, train_dataset=dataset["train"],
                      eval_dataset=dataset["validation"])
    trainer.train(resume_from_checkpoint=args.resume)
    final = os.path.join(args.output_dir, "final")
    trainer.save_model(final)
    print(json.dumps({"log_history": trainer.state.log_history, "final": final,
                      "optimizer": type(trainer.optimizer.optimizer).__name__,
                      "device": str(trainer.args.device), "n_gpu": trainer.args.n_gpu}))


if __name__ == "__main__":
    args = arg_parse()
    main(args)
