"""A hand-written FastAPI KServe v2 endpoint, the peer of bench/peers.py.

Runs in the peers venv (`make bench-peers`): python _peer_fastapi.py PORT NAME=MODEL.onnx...
JSON with the standard library (what FastAPI's own JSONResponse uses) and the binary
tensor extension, one onnxruntime session per model with default options, uvicorn
with one worker.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request, Response

DTYPES = {"FP32": np.float32, "UINT8": np.uint8, "FP64": np.float64, "INT64": np.int64}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER = "inference-header-content-length"


def main() -> None:
    port = int(sys.argv[1])
    sessions = {}
    for spec in sys.argv[2:]:
        name, path = spec.split("=", 1)
        sessions[name] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        session = sessions[name]
        body = await request.body()
        hlen = request.headers.get(HEADER)
        head = json.loads(body if hlen is None else body[: int(hlen)])
        offset = 0 if hlen is None else int(hlen)
        feeds = {}
        for tensor in head["inputs"]:
            dtype = DTYPES[tensor["datatype"]]
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is None:
                array = np.asarray(tensor["data"], dtype=dtype)
            else:
                array = np.frombuffer(body, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                      offset=offset)  # fmt: skip
                offset += size
            feeds[tensor["name"]] = array.reshape(tensor["shape"])
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(None, feeds)
        binary = bool((head.get("parameters") or {}).get("binary_data_output"))
        entries, blobs = [], []
        for out_name, array in zip(names, outputs, strict=True):
            entry = {"name": out_name, "datatype": NAMES[array.dtype], "shape": list(array.shape)}
            if binary:
                raw = array.tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = array.reshape(-1).tolist()
            entries.append(entry)
        reply = json.dumps({"model_name": name, "outputs": entries}).encode()
        if not blobs:
            return Response(reply, media_type="application/json")
        return Response(
            reply + b"".join(blobs),
            media_type="application/octet-stream",
            headers={HEADER: str(len(reply))},
        )

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
