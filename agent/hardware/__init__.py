"""What the agent reads of the device's hardware beyond psutil: a Jetson's GPU, rails, zones.

`tegrastats.py` parses NVIDIA's tegrastats lines, `sysfs.py` reads the same figures from
/sys where tegrastats is absent, and `jetson.py` owns the tegrastats child process for
the agent's lifetime. The figures go out as the `accelerator` block of telemetry
(agent/protocol/accelerator.py) and as gauges on /metrics (`gauges.accelerator_gauges`).
"""
