"""Build stage: checkpoint to device bundle (export, parity check, manifest). Needs ``edgekit[build]``."""
