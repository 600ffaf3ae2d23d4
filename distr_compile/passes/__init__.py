"""FX passes over the Dynamo graph: find attention sites and rewrite them to ``distr::attention``.

Plain functions over ``torch.fx.Graph`` in the style of ``torch/_inductor/fx_passes``:
``find_attention`` only reads, ``rewrite_attention`` only writes the sites it is given.
"""

from .match import AttentionSite, SiteNames, SkippedSite, find_attention
from .rewrite import SITE_META, drop_maps, register_maps, rewrite_attention, use_simpler_masks

__all__ = ["AttentionSite", "SITE_META", "SiteNames", "SkippedSite", "drop_maps", "find_attention", "register_maps",
           "rewrite_attention", "use_simpler_masks"]
