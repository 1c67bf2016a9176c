"""edgerun build side: turn models into signed bundles (CLI `edge-export`)."""
