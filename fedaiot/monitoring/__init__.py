"""Monitoring and alerting, without the service: the population stability index of binned
counts (``drift``), counts kept in time slots (``window``), the alert rules file and its
validation (``rules``), what a run's journal says about its nodes (``journal``), the promotion
gate (``gate``), alert events and their firing state (``events``), and the webhook that sends
them (``webhook``).

The service (``fedaiot.serving``) feeds these with counts and acts on what they decide. Imports
``fedaiot.errors``, ``fedaiot.tasks.histogram``, ``fedaiot.registry`` and
``fedaiot.rounds.journal``; no torch, no web framework.
"""
