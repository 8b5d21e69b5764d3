"""Fleet: a Celery worker fleet for unattended agents. This package is the plain-Python core."""

from __future__ import annotations

__version__ = "0.1.0"
