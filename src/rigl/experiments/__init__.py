"""Experiments: models, data, training loop, sweeps, plots, reports and the `rigl` CLI."""
