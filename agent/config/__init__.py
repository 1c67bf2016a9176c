"""Agent configuration: typed models (model.py), a strict builder (typed.py), the loader.

Import from the submodules; this package stays empty so runtime modules can use
`agent.config.typed` without pulling in the whole config (and so themselves).
"""
