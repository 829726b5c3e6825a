"""Putting bundles onto devices: SSH deploys, first-boot provisioning, the device layout, wheelhouses."""
