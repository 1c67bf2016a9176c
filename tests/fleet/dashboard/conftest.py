"""The dashboard's shared fixtures (tests/fleet/dashboard/_server.py)."""

from tests.fleet.dashboard._server import dashboard, dashboard_bundle

__all__ = ["dashboard", "dashboard_bundle"]
