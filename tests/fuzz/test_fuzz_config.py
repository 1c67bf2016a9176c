"""A bounded run of the config-loader fuzz harness (tests/fuzz/fuzz_config.py)."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz import run_harness

SEEDS = [
    b'device_id = "cam-1"\nstate_dir = "/var/lib/edgerun"\n[memory]\nmax_mb = 256\n'
    b'soft_limit_fraction = 0.8\n[api]\ntcp = "127.0.0.1:8080"\nidle_timeout_s = 30.0\n',
    b"[memory]\nsoft_limit_fraction = nan\n[telemetry]\ninterval_s = inf\n",
    b'[mqtt]\nenabled = true\nhost = "broker"\nport = 8883\ngroups = ["a", "b"]\n'
    b'[mqtt.tls]\nenabled = true\nmin_version = "1.3"\n',
    b'[runtimes.onnxruntime]\nintra_op_threads = 2\n[model]\npreference = ["litert"]\n',
    b"a = [[[[{b = [1, 2.5, nan]}]]]]\n",
]


def test_config_loader_fuzz_harness_finds_nothing(tmp: Path) -> None:
    proc = run_harness("config", runs=3000, max_len=2048, seeds=SEEDS, workdir=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 3000 runs" in proc.stderr, proc.stderr[-2000:]
