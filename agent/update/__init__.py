"""Over-the-air model updates: deploy, fetch, verify, validate, swap, trial, commit or roll back.

A newcomer looking for "update" starts here. One deploy is one *job*, run on its own
thread (commands such as ``ping`` and ``status`` keep answering while it runs), through
phases that are persisted in ``STATE/update.json`` before each one starts, so a crash
at any instant maps to a defined next step at the following start (Mender's state
machine is the model; the table lives in ``agent/update/recovery.py``)::

    accepted -> downloading -> verifying -> validating -> [shadow] -> swapping -> trial
             -> committed                      (any failure before swapping: failed,
                                                the old model never stopped serving)
    trial breach / crash-loop in trial         -> rolled_back (version marked bad)

Modules (each small, each the one owner of its state):

| module | what it does |
|---|---|
| ``model.py`` | typed wire and state types: ``DeployRequest``, sources, ``Phase``, trial/shadow specs |
| ``errors.py`` | ``UpdateError`` with stable ``update.*`` codes (the one error root of this package) |
| ``ports.py`` | the narrow seams: ``Fetcher``, ``ChunkTransport``, ``TrialMonitor``, ``ShadowRunner``, ``UpdateService`` |
| ``jobs.py`` | the job runner and its phases (uses ``Admission`` and ``ModelHost`` for verify/validate/swap) |
| ``journal.py`` | ``STATE/update.json`` (atomic writes), bad versions, crash counter |
| ``recovery.py`` | the "where it died -> what next" table, applied at start |
| ``fetch/http.py``, ``fetch/mqtt.py`` | downloads: resumable HTTP(S) with a bandwidth cap; MQTT chunk transfers |
| ``diskspace.py`` | free-space check before a job starts |
| ``trial.py`` | the ML watchdog after a swap: error rate, p95, RSS growth, non-finite outputs, drift |
| ``shadow.py`` | the candidate beside the served model on a sample of live requests, in a CPU budget |
| ``index.py`` | the signed release index (expiry + monotonic counter) for pull updates and KubeEdge |

Contract: docs/mqtt.md ("Updates") and docs/DESIGN.md.
"""
