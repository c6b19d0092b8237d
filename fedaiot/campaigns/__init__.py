"""Continuous federation: campaigns that continue from the served model and register a
candidate version for the promotion gate (``fedaiot coordinator campaign``). Imports the
simulation engine to train, the registry to read the base and register the candidate, and the
service's audit log (``serving.audit``) to record each campaign's outcome."""
