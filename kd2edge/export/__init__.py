"""The export stage: GPTQ checkpoint -> ONNX artifact (backends in the top-level `exporters`)."""
