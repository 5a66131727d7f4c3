"""Numeric parity between eager PyTorch pipelines and their exports: metrics, results, reports."""
