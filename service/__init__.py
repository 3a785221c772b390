"""The StepNet inference service: FastAPI on ONNX Runtime (docs/design.md 2).

It reads the model repository (model.onnx + model.json) and nothing else of the training side, so
it imports neither torch nor the `models` and `export` packages.
"""
