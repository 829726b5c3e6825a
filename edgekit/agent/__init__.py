"""The device as an agent: tool definitions and calls, and constrained decoding."""
