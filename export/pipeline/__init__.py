"""The `edge-export build` pipeline: recipe -> distill -> prune -> ONNX/TFLite -> INT8 -> gates -> bundle.

Each step is a small module named for what it does; `build.run_build` wires them.
"""
