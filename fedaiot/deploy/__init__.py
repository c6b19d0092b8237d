"""Real deployment on Flower's deployment engine: provisioning, the SuperLink, the SuperNodes."""
