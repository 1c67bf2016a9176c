"""Local inference API: Open Inference Protocol (KServe v2) over HTTP on a Unix socket."""
