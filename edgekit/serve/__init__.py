"""On-device service: the MQTT daemon, its wire protocol, telemetry. No torch, no transformers."""
