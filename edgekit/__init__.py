"""edgekit: small Qwen3.5 language models on edge and IoT devices."""

__version__ = "0.1.0"
