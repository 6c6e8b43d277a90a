"""Evaluation utilities for reranking (ranking metrics)."""
