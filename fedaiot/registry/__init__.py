"""Versioned global models: ``store`` (safetensors weights, JSON manifest, refs, hash checks)
and ``signing`` (the coordinator's Ed25519 keys and signatures). Imports ``fedaiot.errors``
only; ``signing`` loads no torch."""
