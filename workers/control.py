"""Celery remote control used by `fleet kill --hard`: revoke and terminate in-flight executes."""

from __future__ import annotations

from workers.app import app


def revoke_in_flight(agent: str | None = None) -> int:
    """Revoke with terminate every active fleet.execute (of one agent, when given); returns how many."""
    active = app.control.inspect(timeout=2.0).active() or {}
    ids = [task["id"] for tasks in active.values() for task in tasks if task.get("name") == "fleet.execute"]
    if ids:
        app.control.revoke(ids, terminate=True, signal="SIGTERM")
    return len(ids)
