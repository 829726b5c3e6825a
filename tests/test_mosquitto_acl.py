"""deploy/mosquitto's ACL, enforced by a real Mosquitto: devices and clients stay in their lanes."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import openai
import paho.mqtt.client as mqtt
import pytest

from edgekit.client import DeviceClient
from edgekit.gateway.app import BackgroundGateway, Gateway, GatewaySettings
from edgekit.gateway.fleet import Fleet
from edgekit.gateway.tokens import TokenStore
from edgekit.serve.daemon import Daemon, DaemonConfig

from .conftest import broker_at, free_port, start_mosquitto
from .test_vision import PNG

DEPLOY = Path(__file__).parent.parent / "deploy" / "mosquitto"
USERS = {"kitchen": "k-pass", "pantry": "p-pass", "client-ha": "c-pass", "gateway": "g-pass"}


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("acl")
    passwd = folder / "passwd"
    for index, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if index == 0 else []), str(passwd), user, password],
                       check=True)
    port = free_port()
    (folder / "mosquitto.conf").write_text(
        f"per_listener_settings false\nallow_anonymous false\npassword_file {passwd}\n"
        f"acl_file {DEPLOY / 'edgekit.acl'}\nlistener {port} 127.0.0.1\nuser root\n"
    )
    process = start_mosquitto(folder / "mosquitto.conf", port)
    yield port
    process.terminate()
    process.wait(timeout=10)


def _raw(port: int, user: str) -> tuple[mqtt.Client, list[mqtt.MQTTMessage]]:
    got: list[mqtt.MQTTMessage] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(user, USERS[user])
    client.on_message = lambda c, u, m: got.append(m)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client, got


def test_example_acl_keeps_devices_and_clients_apart(acl_broker: int, host_bundle: Path) -> None:
    port = acl_broker
    daemon = Daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(port, username="kitchen", password=USERS["kitchen"]),
                                 device_id="kitchen", pools=("house",)))
    thread = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    try:
        with DeviceClient(broker_at(port, username="client-ha", password=USERS["client-ha"])) as client:
            client.wait_for_state("kitchen", "online", timeout=10)
            assert client.ask("kitchen", {"prompt": "hi", "max_tokens": 2})["type"] == "final"
            # An image uploaded under the client's own level, then named in a request.
            part = client.upload_image("kitchen", PNG)
            final = client.ask("kitchen", {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
            assert final["type"] == "final" and final["usage"]["image_tokens"] > 0
            request_id = client.send(None, {"prompt": "pool", "max_tokens": 2}, pool="house")
            *_, last = client.replies(request_id, timeout=30)
            assert last["type"] == "final" and last["device_id"] == "kitchen"
            # A client cannot forge a device's status.
            client.publish("edgekit/v1/kitchen/status", json.dumps({"device_id": "kitchen", "state": "forged"}))
            time.sleep(0.3)
            assert client.statuses(0.5)["kitchen"]["state"] == "online"

        # The gateway's user: enough to list the fleet and serve a chat completion and a pool, and no more.
        with DeviceClient(broker_at(port, username="gateway", password=USERS["gateway"])) as client:
            fleet = Fleet(client)
            gateway = BackgroundGateway(Gateway(GatewaySettings(port=0), fleet, TokenStore(None)))
            try:
                api = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
                assert {"kitchen", "pool:house"} <= {m.id for m in api.models.list()}
                for model in ("kitchen", "pool:house"):
                    reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
                    assert reply.system_fingerprint == "kitchen"
            finally:
                gateway.stop()
            client.publish("edgekit/v1/kitchen/status", json.dumps({"device_id": "kitchen", "state": "forged"}))
            time.sleep(0.3)
            assert client.statuses(0.5)["kitchen"]["state"] == "online"

        # Home Assistant (client-ha) reads the device's discovery config and may prompt it.
        ha_view, discovered = _raw(port, "client-ha")
        ha_view.subscribe("homeassistant/device/+/config", qos=1)
        deadline = time.time() + 10
        while not discovered and time.time() < deadline:
            time.sleep(0.1)
        assert [m.topic for m in discovered] == ["homeassistant/device/edgekit_kitchen/config"]
        ha_view.loop_stop()
        ha_view.disconnect()

        # A device neither reads another device's requests nor writes its status.
        kitchen, seen = _raw(port, "kitchen")
        kitchen.subscribe("edgekit/v1/pantry/request", qos=1)
        kitchen.publish("edgekit/v1/pantry/status", json.dumps({"state": "forged"}), qos=1, retain=True)
        kitchen.publish("homeassistant/device/edgekit_pantry/config", json.dumps({"forged": True}), qos=1, retain=True)
        ha, ha_seen = _raw(port, "client-ha")
        ha.subscribe("edgekit/v1/pantry/status", qos=1)
        ha.subscribe("homeassistant/device/edgekit_pantry/config", qos=1)
        time.sleep(0.3)
        ha.publish("edgekit/v1/pantry/request", json.dumps({"id": "x", "prompt": "y"}), qos=1)
        time.sleep(1.0)
        assert seen == [] and ha_seen == []
        for raw in (kitchen, ha):
            raw.loop_stop()
            raw.disconnect()
    finally:
        daemon.stop()
        thread.join(timeout=30)
