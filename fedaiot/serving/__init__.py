"""The role-gated, audited inference service for the registry's global model.

``create_app`` and the settings are imported on first use: ``fedaiot audit`` and the token
commands read this package without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedaiot.serving.app import ServingStartupError, create_app
    from fedaiot.serving.settings import ServingSettings

__all__ = ["ServingSettings", "ServingStartupError", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("ServingStartupError", "create_app"):
        from fedaiot.serving import app

        return getattr(app, name)
    if name == "ServingSettings":
        from fedaiot.serving.settings import ServingSettings

        return ServingSettings
    raise AttributeError(name)
