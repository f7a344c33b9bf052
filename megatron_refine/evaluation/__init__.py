"""Evaluations of trained models."""

from megatron_refine.evaluation.recall import RecallResult, key_value_recall

__all__ = ["RecallResult", "key_value_recall"]
