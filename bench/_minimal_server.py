"""The leanest Unix-socket inference server we could write, for scale in overhead.py.

asyncio Protocol, one onnxruntime session with the same settings as the agent's
default, no checks, no metrics, no JSON: what any Python socket server pays.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, socket_path, input_name, row_shape = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    shape = tuple(int(d) for d in row_shape.split(","))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buffer = bytearray()

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            x = np.frombuffer(body, np.float32).reshape((-1, *shape))
            out = session.run(None, {input_name: x})[0].tobytes()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(out) + out)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_unix_server(Server, path=socket_path)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
