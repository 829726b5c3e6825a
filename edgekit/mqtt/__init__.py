"""The MQTT wire: topics, broker settings, protocol messages and the paho connection.

The daemon, the command-line client and provisioning all speak through this package, so a field
added to the protocol or to the broker settings is added once. Nothing here imports torch,
transformers or ONNX Runtime.
"""
