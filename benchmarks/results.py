"""One way for every benchmark script to record a result: a markdown table under a dated heading
that names the device and versions, printed and appended to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import pathlib

import torch
import triton
from tabulate import tabulate


def environment(device: str | torch.device = "cuda") -> str:
    """'<device>, torch X, triton Y' for the device the numbers were measured on."""
    cuda = torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    return f"{name}, torch {torch.__version__}, triton {triton.__version__}"


def append_section(path: pathlib.Path | None, title: str, description: str, rows: list[dict],
                   device: str | torch.device = "cuda", floatfmt: str = ".3f") -> str:
    """Print ``rows`` as a markdown table and, unless ``path`` is None, append it to ``path`` under
    '## title (date)' and '<environment>, <description>'. Returns the table."""
    table = tabulate(rows, headers="keys", floatfmt=floatfmt, tablefmt="github", missingval="-")
    print("\n" + table)
    if path is not None:
        header = f"\n## {title} ({datetime.date.today()})\n\n{environment(device)}, {description}\n\n"
        with path.open("a") as f:
            f.write(header + table + "\n")
        print(f"table appended to {path}")
    return table
