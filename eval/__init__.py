"""Thin entry scripts over `moecxl.evaluation`: perplexity.py, latency.py, report.py."""
