"""The ``fedaiot`` command (``main``) and its command groups. Each command imports what it
needs when it runs, so that ``fedaiot --help`` and the light commands start without torch."""
