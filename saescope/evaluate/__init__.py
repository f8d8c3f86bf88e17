"""Evaluation of SAE suites: metrics (Gemma Scope §4, App. C), the shared clean pass and the layer-cached
spliced pass, and the run-directory entry point (:func:`evaluate_run`)."""

from saescope.evaluate.layer_cache import CleanPass, clean_pass, mean_centered_logit_gradient, spliced_losses
from saescope.evaluate.run import EvalConfig, evaluate_run, find_suite, held_out_batches, load_targets
from saescope.evaluate.suite import (
    EvalBatch,
    EvalTarget,
    MetricOptions,
    evaluate_saes,
    table_rows,
    write_eval,
)

__all__ = ["CleanPass", "EvalBatch", "EvalConfig", "EvalTarget", "MetricOptions", "clean_pass", "evaluate_run",
           "evaluate_saes", "find_suite", "held_out_batches", "load_targets", "mean_centered_logit_gradient", "spliced_losses",
           "table_rows", "write_eval"]
