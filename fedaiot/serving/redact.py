"""Text that leaves the service: no file paths, and no caller text beyond short safe labels."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# An absolute POSIX or Windows path, or one under the home folder, where a word starts.
_PATH = re.compile(r"""(?<![\w.\-])(?:~?/|[A-Za-z]:\\)[^\s'"(),;:]*""")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@:+\-]")
_PATH_KEYS = ("dir", "path", "file", "home", "root")


def redact_paths(text: str, roots: Iterable[Path] = ()) -> str:
    """``text`` with the given folders (as written and resolved) and any absolute path replaced
    by ``<path>``: error details name what is wrong, not where the server keeps its files."""
    for root in roots:
        for form in {str(root), str(Path(root).resolve())}:
            if form not in ("", "."):
                text = text.replace(form, "<path>")
    return _PATH.sub("<path>", text)


def label(value: Any, limit: int = 64) -> str:
    """A caller-supplied value as a short label safe to store and show: ASCII letters, digits
    and ``._@:+-`` only (anything else becomes ``_``), at most ``limit`` characters."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return ""
    return _UNSAFE.sub("_", str(value)[:limit])


def without_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A training configuration without the entries that name files or folders."""
    kept: dict[str, Any] = {}
    for key, value in config.items():
        if any(part in key.lower() for part in _PATH_KEYS):
            continue
        if isinstance(value, str) and _PATH.search(value):
            continue
        kept[key] = value
    return kept
