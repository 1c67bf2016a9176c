"""The dashboard's shared fixtures (tests/fleet/dashboard/_server.py)."""

from tests.fleet.dashboard._server import dashboard

__all__ = ["dashboard"]
