"""distr-compile: a torch.compile backend that swaps attention for DistrAttention.

Public API: ``distr_attention`` (SDPA's calling convention), ``DistrConfig`` (every knob), the
registered op ``torch.ops.distr.attention`` (importing this package registers it), and the
guard's user side: ``calibrate`` (decisions from user batches), ``plan_of`` / ``DistrPlan``
(decisions as JSON) and ``report`` (per-site table and chart). The backend itself is
``torch.compile(model, backend="distr", options={...})`` through the entry point.
"""

from .config import DistrConfig
from .guard import DistrPlan, calibrate, plan_of, report
from .ops import SCHEMA_VERSION, distr_attention

__all__ = ["DistrConfig", "DistrPlan", "SCHEMA_VERSION", "calibrate", "distr_attention", "plan_of", "report"]
__version__ = "0.1.0"
