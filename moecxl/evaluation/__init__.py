"""Evaluation logic behind `eval/*.py` and the notebooks: perplexity, latency sweeps, reports, result files.

Modules: `perplexity` (resident vs each policy, teacher-forced), `latency` (sweeps with medians and
IQR), `report` (markdown + plots from result files), `results` (the result JSON schema, versioned),
`inputs` (models, profiles, targets, tiny mode for notebooks).
"""
