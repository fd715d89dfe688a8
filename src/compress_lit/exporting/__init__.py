"""A trained student (or its teacher) as a deployable file (``python -m compress_lit.export``): ONNX or
TorchScript, checked against PyTorch, with its size, FLOPs and latency."""
