"""Evaluation: datasets, metric formulas, the paper's sequential protocol, and reports."""
