"""`edge-fleet serve`: the fleet dashboard (Starlette + uvicorn), over the console's own
view (MQTT) and record (store).

    app.py        create_app(view, store, ...): routes, security headers, pages, static
    api.py        the JSON endpoints (docs/DESIGN.md "Dashboard HTTP API")
    rows.py       DeviceRow -> JSON, health classes, filtering/sorting/paging
    devlog.py     per-device recent events and model history the view does not keep
    live.py       the server-sent events hub (coalesced device changes, rollout tails)
    auth.py       credentials, sessions, CSRF, the login rate limit
    retention.py  telemetry -> the store in batches, pruned to the retention
    rollouts.py   a rollout's JSON, folded once and then kept up with new records

The pages themselves (static/) are plain ES modules calling the API.
"""
