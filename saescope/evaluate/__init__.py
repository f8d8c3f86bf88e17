"""Evaluation of SAE suites: metrics (Gemma Scope §4, App. C), the shared clean pass and the layer-cached
spliced pass, and the run-directory entry point."""

from saescope.evaluate.layer_cache import CleanPass, clean_pass, mean_centered_logit_gradient, spliced_losses
from saescope.evaluate.suite import EvalBatch, EvalTarget, evaluate_saes, table_rows, write_eval

__all__ = ["CleanPass", "EvalBatch", "EvalTarget", "clean_pass", "evaluate_saes", "mean_centered_logit_gradient",
           "spliced_losses", "table_rows", "write_eval"]
