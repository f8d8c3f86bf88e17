"""Latent dashboards: top contexts, quantile samples, histogram and logit effect per latent, as static HTML."""

from saescope.dashboards.build import build_dashboards, load_latent, load_summary
from saescope.dashboards.compute import DashboardSettings, compute_latent_stats
from saescope.dashboards.logit_effect import logit_effect, top_logit_tokens

__all__ = ["DashboardSettings", "build_dashboards", "compute_latent_stats", "load_latent", "load_summary",
           "logit_effect", "top_logit_tokens"]
