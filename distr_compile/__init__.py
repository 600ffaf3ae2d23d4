"""distr-compile: a torch.compile backend that swaps attention for DistrAttention.

Public API: ``distr_attention`` (SDPA's calling convention), ``DistrConfig`` (every knob), and
the registered op ``torch.ops.distr.attention`` (importing this package registers it).
"""

from .config import DistrConfig
from .ops import SCHEMA_VERSION, distr_attention

__all__ = ["DistrConfig", "SCHEMA_VERSION", "distr_attention"]
__version__ = "0.1.0"
