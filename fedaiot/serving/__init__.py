"""The role-gated, audited inference service for the registry's global model."""

from __future__ import annotations

from fedaiot.serving.app import ServingStartupError, create_app
from fedaiot.serving.settings import ServingSettings

__all__ = ["ServingSettings", "ServingStartupError", "create_app"]
