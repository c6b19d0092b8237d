"""Real deployment on Flower's deployment engine: provisioning (keys, TLS), the coordinator's
kit (SuperLink, registration, roster, run) and the institution's kit (data check, SuperNode),
started through ``launch``. May import every layer below it."""
