"""The gateway: an OpenAI- and Ollama-compatible HTTP front for a fleet of edgekit devices.

HTTP requests become protocol requests over MQTT (:mod:`.fleet`); who may ask what is settled by
the token file (:mod:`.tokens`); :mod:`.openai_api` and :mod:`.ollama_api` translate the two API
shapes; :mod:`.metrics` serves Prometheus figures; :mod:`.app` puts it together (docs/gateway.md).
"""
