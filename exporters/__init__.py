"""Exporters: one module per format (ONNX, GGUF). Checkpoint in, files out, verified before success."""
