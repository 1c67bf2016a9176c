"""MLServer's custom ONNX Runtime model, the peer of bench/peers.py (peers venv only).

MLServer 1.7 ships no ONNX runtime of its own; this is the custom runtime its docs
describe (an MLModel whose load() opens the session and predict() decodes with
NumpyCodec), with default onnxruntime session options like the other servers.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        self.session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        outputs = self.session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output(name, array)
                for name, array in zip(self.output_names, outputs, strict=True)
            ],
        )
