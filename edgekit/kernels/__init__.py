"""Native kernels edgekit ships beside ONNX Runtime, as custom-op libraries built with the wheel."""
