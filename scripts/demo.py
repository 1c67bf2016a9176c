"""`make demo`: run the agent offline on the sample bundle and talk to it.

Starts `edge-agent run` on models/digits (no network, no broker), sends a few
digit images through the local API over its Unix socket, prints the answers
and the agent's metrics, then stops it with SIGTERM as systemd would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.api.client import ApiClient

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models/digits/digits-1.0.0.edgebundle"
DEMO_KEY = ROOT / "models/keys/demo-INSECURE.pub"
SAMPLES = ROOT / "models/digits/samples.npz"


def wait_ready(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"agent exited early with code {proc.returncode}")
        if sock.exists():
            try:
                with ApiClient(str(sock), timeout=2) as c:
                    status, _, _ = c.request("GET", "/v2/health/ready")
                    if status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
        time.sleep(0.05)
    raise SystemExit("agent did not become ready in time")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="edgerun-demo-") as tmp:
        t = Path(tmp)
        sock = t / "api.sock"
        config = t / "agent.toml"
        config.write_text(
            f'device_id = "demo-device"\nstate_dir = "{t / "state"}"\n'
            f'[model]\nbundle = "{BUNDLE}"\n'
            f'[trust]\npublic_keys = ["{DEMO_KEY}"]  # the INSECURE demo key: demo only\n'
            f'[api]\nsocket = "{sock}"\n'
        )
        print(f"$ edge-agent check-config {config}")
        subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(config)], check=True)
        print(f"$ edge-agent run --config {config}   (offline: no broker, no network)")
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)])
        try:
            ready = wait_ready(sock, proc)
            print(f"agent ready after {ready:.2f} s (process start included)\n")
            with np.load(SAMPLES) as data:
                images, labels = data["input"], data["label"]
            with ApiClient(str(sock)) as client:
                meta = client.get_json("/v2/models/digits")
                print(
                    f"model {meta['name']} {meta['versions'][0]} on "
                    f"{meta['parameters']['runtime']['runtime']}"
                )
                correct = 0
                for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                    out = client.infer("digits", {"input": image[None]}, binary=i % 2 == 1)
                    logits = out["logits"][0]
                    p = np.exp(logits - logits.max())
                    p /= p.sum()
                    guess = int(p.argmax())
                    correct += guess == int(label)
                    print(f"  image {i}: answer {guess} (p={p[guess]:.3f}), true label {label}")
                batch = client.infer("digits", {"input": images})
                print(f"  batch of {len(images)}: {batch['logits'].argmax(1).tolist()}")
                print(f"\n{correct}/{len(images)} correct\n")
                print("metrics (GET /metrics, excerpt):")
                for line in client.metrics().splitlines():
                    if line.startswith(
                        (
                            "edgerun_inference_requests_total",
                            "edgerun_inference_latency_seconds_sum",
                            "edgerun_inference_latency_seconds_count",
                            "edgerun_process_resident_memory_bytes",
                            "edgerun_memory_cap_bytes",
                            "edgerun_model_info",
                        )
                    ):
                        print(f"  {line}")
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        print(f"\nagent stopped on SIGTERM with exit code {code}")
        return 0 if code == 0 and correct >= len(labels) - 1 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
