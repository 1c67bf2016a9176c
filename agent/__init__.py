"""edgerun device agent: serves a signed model bundle locally and talks to its fleet."""

__version__ = "0.1.0"
