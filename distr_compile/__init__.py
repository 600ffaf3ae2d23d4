"""distr-compile: a torch.compile backend that swaps attention for DistrAttention.

Public API: ``distr_attention`` (SDPA's calling convention), ``DistrConfig`` (every knob), the
registered op ``torch.ops.distr.attention`` (importing this package registers it), and the
guard's user side: ``calibrate`` (decisions from user batches), ``plan_of`` / ``DistrPlan``
(decisions as JSON) and ``report`` (per-site table and chart). The backend itself is
``torch.compile(model, backend="distr", options={...})`` through the entry point.
``export`` / ``rewrite_exported`` give ``torch.export`` programs with the op at the sites the guard
approximates (load them with ``import distr_compile`` first). ``configure`` sets what each layer
of a transformers model loaded with ``attn_implementation="distr"`` computes, in eager mode (importing
this package registers "distr" with transformers when transformers' modeling code loads).
"""

from .config import DistrConfig
from .export import export, rewrite_exported
from .guard import DistrPlan, calibrate, plan_of, report
from .hf import configure, register_when_imported
from .ops import SCHEMA_VERSION, distr_attention

__all__ = ["DistrConfig", "DistrPlan", "SCHEMA_VERSION", "calibrate", "configure", "distr_attention", "export", "plan_of",
           "report", "rewrite_exported"]
__version__ = "0.1.0"

register_when_imported()
