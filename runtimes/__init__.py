"""Runtimes: one module per runtime (torch reference, onnxruntime, llama.cpp) behind the same small interface."""
