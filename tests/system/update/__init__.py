"""Over-the-air updates across real processes (issue 8): broker, HTTP server, agent, load."""
