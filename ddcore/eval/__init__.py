"""Evaluation and benchmarks: image metrics from features, torch-fidelity extraction, token-level
distances to the teacher, the evaluate stage, and side-by-side speed measurements."""

from ddcore.eval.fidelity import EvaluationUnavailable, Reference

__all__ = ["EvaluationUnavailable", "Reference"]
