"""Experiments: sweeps over privacy, federation and faults, their baselines, attacks and report."""
