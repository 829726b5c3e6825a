"""The gateway against real daemons on a real Mosquitto, through the official ``openai`` and ``ollama``
clients (the latter with the request shapes Home Assistant's Ollama integration sends)."""

from __future__ import annotations

import base64
import json
import logging
import re
import shlex
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgekit.builder.parity import sample_image
from edgekit.client import DeviceClient, image_part
from edgekit.errors import EdgekitError
from edgekit.gateway.app import BackgroundGateway, Gateway, GatewaySettings
from edgekit.gateway.fleet import Fleet, model_name, parse_model
from edgekit.gateway.tokens import TokenStore, add_grant, read_grants, remove_grant
from edgekit.logs import JsonFormatter
from edgekit.mqtt.protocol import Status
from edgekit.mqtt.topics import DeviceTopics
from edgekit.serve.config import DaemonConfig
from edgekit.serve.daemon import Daemon
from edgekit.serve.embedded_broker import free_port, wait_for_port

from .conftest import broker_at, start_daemon
from .test_vision import encoded

POOL = "house"
# The gateway's cap on max_tokens: room for a reply long enough that a client can leave before it ends
# (the tiny fixture writes 500 tokens in about a second and a half).
MAX_TOKENS = 4096
SET_LIGHT = {"type": "function", "function": {
    "name": "set_light", "description": "Switch a room's light.", "strict": True,
    "parameters": {"type": "object", "properties": {"room": {"type": "string", "enum": ["kitchen", "hall"]}, "on": {"type": "boolean"}},
                   "required": ["room", "on"], "additionalProperties": False}}}


class Fixture:
    """Two pool members and a lone device behind one gateway, with three grants."""

    def __init__(self, devices: list[Daemon], fleet: Fleet, tokens_file: Path, secrets: dict[str, str], gateway: BackgroundGateway):
        self.devices, self.fleet, self.tokens_file, self.secrets, self.gateway = devices, fleet, tokens_file, secrets, gateway

    @property
    def device(self) -> str:
        return self.devices[0].config.device_id

    def openai(self, grant: str = "alice", **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=self.secrets[grant], max_retries=0, **options)


@pytest.fixture(scope="module")
def fleet_client(broker: int) -> Iterator[DeviceClient]:
    with DeviceClient(broker_at(broker)) as client:
        yield client


@pytest.fixture(scope="module")
def gw(host_bundle: Path, broker: int, fleet_client: DeviceClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    tag = uuid.uuid4().hex[:6]
    devices = [start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=f"gw-{tag}-{i}",
                                         pools=(POOL,) if i else (), queue_size=1, telemetry_interval=0.5))
               for i in range(3)]
    tokens_file = tmp_path_factory.mktemp("gateway") / "tokens.yaml"
    secrets = {"alice": add_grant(tokens_file, "alice", (), 0, 0),
               "bob": add_grant(tokens_file, "bob", (f"pool:{POOL}",), 0, 0),
               "carol": add_grant(tokens_file, "carol", (), 0, 1)}
    fleet = Fleet(fleet_client)
    gateway = BackgroundGateway(Gateway(GatewaySettings(port=0, tokens=tokens_file, max_body_bytes=64 * 1024, max_tokens=MAX_TOKENS,
                                                        first_reply_s=5.0, request_timeout_s=60.0),
                                        fleet, TokenStore(tokens_file)))
    yield Fixture([d for d, _ in devices], fleet, tokens_file, {k: str(v) for k, v in secrets.items()}, gateway)
    gateway.stop()
    for daemon, thread in devices:
        daemon.stop()
        thread.join(timeout=30)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_model_names_keep_devices_and_pools_apart() -> None:
    assert parse_model("kitchen").device == "kitchen"
    assert parse_model("pool:house").pool == "house"
    assert parse_model("device:pool:odd").device == "pool:odd"
    assert model_name("pool:odd") == "device:pool:odd" and model_name("kitchen") == "kitchen"


def test_chat_completion_streamed_and_not_agree(gw: Fixture) -> None:
    client = gw.openai()
    whole = client.chat.completions.create(model=gw.device, messages=ask("Name a colour."), max_tokens=12, seed=1, n=1)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 12
    assert whole.system_fingerprint == gw.device
    stream = client.chat.completions.create(model=gw.device, messages=ask("Name a colour."), max_tokens=12, seed=1, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same tokens either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_models_lists_devices_and_pools(gw: Fixture) -> None:
    models = {m.id: m for m in gw.openai().models.list()}
    lone = models[gw.device].model_dump()
    assert lone["kind"] == "device" and lone["profile"] == "host" and lone["context_length"] > 0 and lone["bundle"]
    pool = models[f"pool:{POOL}"].model_dump()
    assert pool["kind"] == "pool" and set(pool["members"]) >= {d.config.device_id for d in gw.devices[1:]}
    # bob may use the pool only, and sees only that
    assert [m.id for m in gw.openai("bob").models.list()] == [f"pool:{POOL}"]


def test_pool_requests_spread_over_members(gw: Fixture) -> None:
    client = gw.openai("bob")
    served = set()
    for i in range(6):
        reply = client.chat.completions.create(model=f"pool:{POOL}", messages=ask(f"job {i}"), max_tokens=2)
        served.add(reply.system_fingerprint)
    assert served == {d.config.device_id for d in gw.devices[1:]}


def test_tool_call_round_trip(gw: Fixture) -> None:
    client = gw.openai()
    forced = {"type": "function", "function": {"name": "set_light"}}
    reply = client.chat.completions.create(model=gw.device, messages=ask("It is dark in the kitchen."), tools=[SET_LIGHT],
                                           tool_choice=forced, max_tokens=64, parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "set_light" and arguments["room"] in ("kitchen", "hall") and isinstance(arguments["on"], bool)
    # streamed: the call is announced by name, then its arguments arrive whole
    chunks = list(client.chat.completions.create(model=gw.device, messages=ask("It is dark in the kitchen."), tools=[SET_LIGHT],
                                                 tool_choice=forced, max_tokens=64, parallel_tool_calls=False,
                                                 stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "set_light" and deltas[0].id.startswith("call_")
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == arguments
    # the result goes back as a tool message, with the assistant's call as the client's SDK echoes it
    followup = client.chat.completions.create(model=gw.device, max_tokens=8, messages=[
        *ask("It is dark in the kitchen."), choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"ok": true}'}])
    assert followup.choices[0].finish_reason in ("stop", "length")


def test_json_schema_output_parses(gw: Fixture) -> None:
    schema = {"type": "object", "properties": {"celsius": {"type": "number"}}, "required": ["celsius"], "additionalProperties": False}
    reply = gw.openai().chat.completions.create(model=gw.device, messages=ask("Temperature?"), max_tokens=40,
                                                response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content)["celsius"], int | float)


def test_unsupported_parameters_are_refused_by_name(gw: Fixture) -> None:
    client = gw.openai()
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.chat.completions.create(model=gw.device, messages=ask("hi"), n=2)
    with pytest.raises(openai.BadRequestError, match="'logprobs'"):
        client.chat.completions.create(model=gw.device, messages=ask("hi"), logprobs=True)
    with pytest.raises(openai.BadRequestError, match=f"max_tokens.*at most {MAX_TOKENS}"):
        client.chat.completions.create(model=gw.device, messages=ask("hi"), max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="'temperature'"):  # the device's own check, passed through
        client.chat.completions.create(model=gw.device, messages=ask("hi"), temperature=9)
    # at their defaults they ask for nothing edgekit lacks
    client.chat.completions.create(model=gw.device, messages=ask("hi"), max_tokens=2, n=1, logprobs=False, presence_penalty=0)


@pytest.fixture
def ghost(fleet_client: DeviceClient) -> Iterator[str]:
    """A device that is online by its retained status, with no daemon behind it: it never answers."""
    device = f"ghost-{uuid.uuid4().hex[:6]}"
    topic = DeviceTopics.of("edgekit", device).status
    fleet_client.publish(topic, Status(device, "online", "0", "b", "m", "host", 512, {}, time.time()).encode())
    time.sleep(0.3)
    yield device
    fleet_client.publish(topic, b"")  # an empty retained message removes it


def test_errors_map_to_http_statuses(gw: Fixture, fleet_client: DeviceClient, ghost: str) -> None:
    client = gw.openai()
    with pytest.raises(openai.NotFoundError, match="no device or pool"):
        client.chat.completions.create(model="nobody-here", messages=ask("hi"))
    with pytest.raises(openai.NotFoundError, match="no device serves pool"):
        client.chat.completions.create(model="pool:nobody", messages=ask("hi"))
    with pytest.raises(openai.BadRequestError) as exceeded:
        client.chat.completions.create(model=gw.device, messages=ask(" a" * (gw.devices[0].engine.context_length + 10)))
    assert exceeded.value.code == "context_length_exceeded"
    offline = f"off-{uuid.uuid4().hex[:6]}"
    status = Status(offline, "offline", "0", "b", "m", "host", 512, {}, time.time())
    fleet_client.publish(DeviceTopics.of("edgekit", offline).status, status.encode())
    time.sleep(0.3)
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model=offline, messages=ask("hi"))
    assert unavailable.value.status_code == 503 and unavailable.value.response.headers["Retry-After"]
    fleet_client.publish(DeviceTopics.of("edgekit", offline).status, b"")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as timed_out:
        client.chat.completions.create(model=ghost, messages=ask("hi"))
    assert timed_out.value.status_code == 504 and 4.5 < time.monotonic() - started < 15


def test_busy_device_answers_429(gw: Fixture, fleet_client: DeviceClient) -> None:
    device = gw.device
    # one request generating and one waiting fill the device's queue of one (as in test_serve)
    running = fleet_client.send(device, {"prompt": "long", "max_tokens": 4000})  # still running when refused: cancelled
    stream = fleet_client.replies(running, timeout=120)
    assert [next(stream)["type"], next(stream)["type"]] == ["queued", "chunk"]
    waiting = fleet_client.send(device, {"prompt": "next", "max_tokens": 4000})
    with pytest.raises(openai.RateLimitError) as busy:
        gw.openai().chat.completions.create(model=device, messages=ask("one too many"), max_tokens=4)
    assert busy.value.code == "busy" and int(busy.value.response.headers["Retry-After"]) > 0
    for request_id in (waiting, running):
        fleet_client.cancel(device, request_id)
    list(stream), list(fleet_client.replies(waiting, timeout=30))


def test_client_disconnect_cancels_on_the_device(gw: Fixture, fleet_client: DeviceClient) -> None:
    cancels: list[dict] = []
    topic = DeviceTopics.of("edgekit", gw.device).cancel
    seen = threading.Event()
    with DeviceClient(fleet_client.settings) as watcher:
        watcher._client.message_callback_add(topic, lambda c, u, m: (cancels.append(json.loads(m.payload)), seen.set()))
        watcher._subscribe(topic)
        stream = gw.openai().chat.completions.create(model=gw.device, messages=ask("tell a long story"), max_tokens=MAX_TOKENS - 64,
                                                     stream=True)
        pieces = iter(stream)
        assert [next(pieces) for _ in range(3)][0].choices[0].delta.role == "assistant"
        stream.close()  # the client goes away mid-stream
        assert seen.wait(10), "the gateway did not cancel the request on the device"
    assert cancels[0]["id"]
    deadline = time.monotonic() + 10
    while gw.devices[0].active is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.devices[0].active is None  # the device stopped generating for nobody


def _status(url: str, token: str | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_tokens_scopes_and_revocation(gw: Fixture) -> None:
    url = gw.gateway.url
    assert _status(f"{url}/v1/models") == 401
    assert _status(f"{url}/v1/models", "ek-not-a-token") == 401
    assert _status(f"{url}/metrics") == 401
    with pytest.raises(openai.PermissionDeniedError, match="may not use model"):
        gw.openai("bob").chat.completions.create(model=gw.device, messages=ask("hi"), max_tokens=2)
    secret = add_grant(gw.tokens_file, "dave", (), 0, 0)
    assert _status(f"{url}/v1/models", secret) == 200
    remove_grant(gw.tokens_file, "dave")  # revoked by editing the file: no restart
    assert _status(f"{url}/v1/models", secret) == 401
    assert "dave" not in {g.name for g in read_grants(gw.tokens_file)}


def test_body_over_the_limit_is_413(gw: Fixture) -> None:
    body = json.dumps({"model": gw.device, "messages": ask("x" * 70_000)}).encode()
    assert _status(f"{gw.gateway.url}/v1/chat/completions", gw.secrets["alice"], body) == 413


def test_concurrency_limit_per_grant(gw: Fixture, ghost: str) -> None:
    client = gw.openai("carol")  # one request at a time
    outcome: list[Exception] = []

    def wait_on_the_ghost() -> None:  # in flight until the first-reply timeout
        with pytest.raises(openai.InternalServerError) as timed_out:
            client.chat.completions.create(model=ghost, messages=ask("hello?"))
        outcome.append(timed_out.value)

    worker = threading.Thread(target=wait_on_the_ghost)
    worker.start()
    time.sleep(0.5)
    with pytest.raises(openai.RateLimitError, match="1 requests at once"):
        client.chat.completions.create(model=gw.device, messages=ask("second"), max_tokens=2)
    worker.join(timeout=30)
    assert outcome and outcome[0].status_code == 504
    client.chat.completions.create(model=gw.device, messages=ask("third"), max_tokens=2)  # room again


def test_sessions_are_namespaced_per_token(gw: Fixture) -> None:
    alice, carol = gw.openai(), gw.openai("carol")

    def turn(client: openai.OpenAI, text: str, **session: object) -> dict:
        reply = client.chat.completions.create(model=gw.device, messages=ask(text), max_tokens=4, extra_body=session)
        return reply.model_dump()

    first = turn(alice, "My name is Ada.", session="s1", new_session=True)
    assert first["session"] == "s1"  # the client sees its own id, not the namespaced one
    held = first["usage"]["session_tokens"]

    def fresh(reply: dict) -> bool:  # a new session holds this turn's tokens only (the last one not yet run)
        return reply["usage"]["session_tokens"] <= reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]

    assert fresh(first)
    # carol names the same session: she gets one of her own, with none of alice's history in it
    theirs = turn(carol, "What is my name?", session="s1")
    assert fresh(theirs)
    turn(carol, "Forget it.", session="s1", new_session=True)  # and starting it afresh evicts only hers
    later = turn(alice, "What is my name?", session="s1")
    assert later["usage"]["session_tokens"] >= held + later["usage"]["prompt_tokens"]  # alice's history is intact
    with pytest.raises(openai.BadRequestError, match="a session lives on one device"):
        alice.chat.completions.create(model=f"pool:{POOL}", messages=ask("hi"), extra_body={"session": "s2"})


def test_metrics_scrape(gw: Fixture) -> None:
    gw.openai().chat.completions.create(model=gw.device, messages=ask("count me"), max_tokens=3)
    time.sleep(1.0)  # a telemetry period
    text = httpx.get(f"{gw.gateway.url}/metrics", headers={"Authorization": f"Bearer {gw.secrets['alice']}"}).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    device = gw.device
    assert samples[("edgekit_requests_total", (("api", "openai"), ("model", device), ("outcome", "ok")))] >= 1
    assert samples[("edgekit_prompt_tokens_total", (("model", device),))] > 0
    assert samples[("edgekit_generation_tokens_total", (("model", device),))] > 0
    assert samples[("edgekit_time_to_first_token_seconds_count", (("model", device),))] >= 1
    assert samples[("edgekit_e2e_request_latency_seconds_count", (("model", device),))] >= 1
    up = {labels: v for (name, labels), v in samples.items() if name == "edgekit_device_up"}
    assert any(dict(labels)["device"] == device and v == 1.0 for labels, v in up.items())
    assert samples[("edgekit_device_memory_rss_bytes", (("device", device),))] > 50 * 2**20
    assert ("edgekit_device_queue_depth", (("device", device),)) in samples
    # the shipped Grafana dashboard charts only metrics that exist
    names = {n for family in text_string_to_metric_families(text) for n in (family.name, *(s.name for s in family.samples))}
    dashboard = (Path(__file__).parent.parent / "deploy" / "grafana" / "edgekit-fleet.json").read_text()
    charted = set(re.findall(r"edgekit_[a-z0-9_]+", dashboard)) - {"edgekit_fleet"}
    assert charted and charted <= names, charted - names


def test_ollama_api_as_home_assistant_calls_it(gw: Fixture, tmp_path: Path) -> None:
    # Home Assistant's Ollama integration sends no Authorization header: grant its address instead.
    tokens = tmp_path / "tokens.yaml"
    add_grant(tokens, "home-assistant", (), 0, 0, networks=("127.0.0.1/32",))
    gateway = BackgroundGateway(Gateway(GatewaySettings(port=0, tokens=tokens), gw.fleet, TokenStore(tokens)))
    try:
        client = ollama.Client(host=gateway.url)
        listed = {m["model"] for m in client.list().get("models", [])}  # what its config flow reads
        assert gw.device in listed and f"pool:{POOL}" in listed
        # the call its conversation entity makes (homeassistant/components/ollama/entity.py)
        stream = client.chat(model=gw.device, messages=[{"role": "system", "content": "You control a house."},
                                                        {"role": "user", "content": "Turn on the kitchen light."}],
                             tools=[SET_LIGHT], stream=True, keep_alive="-1s", options={"num_ctx": 8192}, think=False, format=None)
        parts = list(stream)
        assert parts[-1]["done"] and parts[-1]["done_reason"] in ("stop", "length") and parts[-1]["eval_count"] > 0
        assert all(not p["done"] for p in parts[:-1])
        whole = client.chat(model=gw.device, messages=[{"role": "user", "content": "Say hi."}], stream=False,
                            options={"num_predict": 4, "temperature": 0})
        assert whole["done"] and whole["eval_count"] <= 4
        # HA's AI task asks for structured output with a schema in `format`
        schema = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
        shaped = client.chat(model=gw.device, messages=[{"role": "user", "content": "Light on?"}], stream=False, format=schema,
                             options={"num_predict": 24})
        if shaped["done_reason"] == "stop":
            assert isinstance(json.loads(shaped["message"]["content"])["on"], bool)
        with pytest.raises(ollama.ResponseError) as missing:
            client.chat(model="nobody-here", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.status_code == 404
        with pytest.raises(ollama.ResponseError, match="repeat_penalty"):
            client.chat(model=gw.device, messages=[{"role": "user", "content": "hi"}], options={"repeat_penalty": 1.3})
    finally:
        gateway.stop()


def test_refuses_to_expose_the_fleet(tmp_path: Path) -> None:
    with pytest.raises(EdgekitError, match="refuses to listen on 0.0.0.0 without API tokens"):
        GatewaySettings(host="0.0.0.0").check()
    GatewaySettings(host="0.0.0.0", tokens=tmp_path / "t.yaml").check()
    loose = tmp_path / "loose.yaml"
    add_grant(loose, "x", (), 0, 0)
    loose.chmod(0o644)
    with pytest.raises(EdgekitError, match="must be 0600"):
        TokenStore(loose)
    with pytest.raises(EdgekitError, match="exactly one of 'sha256'"):
        (tmp_path / "bad.yaml").write_text("grants:\n  - name: y\n")
        (tmp_path / "bad.yaml").chmod(0o600)
        read_grants(tmp_path / "bad.yaml")


def test_logs_carry_no_prompts_or_tokens(gw: Fixture, caplog: pytest.LogCaptureFixture) -> None:
    secret_prompt = f"my door code is {uuid.uuid4().hex}"
    with caplog.at_level(logging.INFO, logger="edgekit.gateway"):
        reply = gw.openai().chat.completions.create(model=gw.device, messages=ask(secret_prompt), max_tokens=6)
        _status(f"{gw.gateway.url}/v1/models", "ek-wrong-token")
    lines = [JsonFormatter().format(record) for record in caplog.records if record.name == "edgekit.gateway"]
    assert any(json.loads(line)["path"] == "/v1/chat/completions" and json.loads(line)["grant"] == "alice" for line in lines)
    assert any(json.loads(line)["status"] == 401 for line in lines)
    text = "\n".join(lines)
    assert secret_prompt not in text and gw.secrets["alice"] not in text and "ek-wrong-token" not in text
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_daemon_serves_its_own_metrics_on_loopback(host_bundle: Path, broker: int, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    daemon, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker, password="hunter2-secret"),
                                               device_id=f"metrics-{uuid.uuid4().hex[:6]}", telemetry_interval=0.2, metrics_port=port))
    try:
        with DeviceClient(broker_at(broker)) as client, caplog.at_level(logging.INFO):
            client.ask(daemon.device_id, {"prompt": "count me", "max_tokens": 3})
            client.publish(DeviceTopics.of("edgekit", daemon.device_id).request, b'{"id": "x", "prompt": "p", "bogus": 1}')
            time.sleep(0.5)
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        samples = {(s.name, s.labels.get("device")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("edgekit_device_up", daemon.device_id)] == 1.0
        assert samples[("edgekit_device_requests_total", daemon.device_id)] >= 1
        assert samples[("edgekit_device_generation_tokens_total", daemon.device_id)] >= 1
        assert samples[("edgekit_device_memory_rss_bytes", daemon.device_id)] > 50 * 2**20
        # the JSON log form of what the daemon logged: parseable lines, no secret, no prompt
        lines = [JsonFormatter().format(r) for r in caplog.records if r.name.startswith("edgekit")]
        assert any("rejected request x" in json.loads(line)["message"] for line in lines)
        assert not any("hunter2" in line or "count me" in line for line in lines)
    finally:
        daemon.stop()
        thread.join(timeout=30)
    with pytest.raises(httpx.ConnectError):  # stopped with the daemon
        httpx.get(f"http://127.0.0.1:{port}/metrics")


def test_gateway_unit_verifies_and_its_command_parses(tmp_path: Path) -> None:
    unit = (Path(__file__).parent.parent / "deploy" / "systemd" / "edgekit-gateway.service").read_text()
    edgekit = str(Path(sys.executable).parent / "edgekit")
    local = tmp_path / "edgekit-gateway.service"
    local.write_text(unit.replace("/opt/edgekit/venv/bin/edgekit", edgekit))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    assert done.returncode == 0 and "edgekit-gateway.service" not in done.stderr, done.stderr
    # its ExecStart, as systemd would run it, gets as far as the missing token file
    command = shlex.split(unit.split("ExecStart=")[1].split("\nRestart")[0].replace("\\\n", " "))
    ran = subprocess.run([edgekit, *command[1:]], capture_output=True, text=True, timeout=60)
    assert ran.returncode != 0 and "/etc/edgekit/gateway-tokens.yaml: cannot read the token file" in ran.stderr, ran.stderr


def test_cli_refuses_an_open_listener_and_manages_tokens(tmp_path: Path) -> None:
    edgekit = str(Path(sys.executable).parent / "edgekit")
    ran = subprocess.run([edgekit, "gateway", "run", "--listen", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert ran.returncode != 0 and "refuses to listen on 0.0.0.0 without API tokens" in ran.stderr
    tokens = tmp_path / "tokens.yaml"
    added = subprocess.run([edgekit, "gateway", "token", "add", "ci", "--models", "kitchen", "--rpm", "5", "--tokens", str(tokens),
                            "--json"], capture_output=True, text=True, timeout=60)
    secret = json.loads(added.stdout)["token"]
    assert added.returncode == 0 and secret.startswith("ek-") and secret not in tokens.read_text()
    assert tokens.stat().st_mode & 0o777 == 0o600
    (grant,) = read_grants(tokens)
    assert grant.models == ("kitchen",) and grant.requests_per_minute == 5
    again = subprocess.run([edgekit, "gateway", "token", "add", "ci", "--tokens", str(tokens)], capture_output=True, text=True)
    assert again.returncode != 0 and "a grant named 'ci' exists" in again.stderr
    subprocess.run([edgekit, "gateway", "token", "remove", "ci", "--tokens", str(tokens)], check=True, capture_output=True)
    assert read_grants(tokens) == []


def test_https_metrics_listener_cors_and_limits(gw: Fixture, tmp_path: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=tmp_path, check=True, capture_output=True)
    tokens = tmp_path / "tokens.yaml"
    secret = add_grant(tokens, "metered", (), 2, 0)
    settings = GatewaySettings(port=0, tokens=tokens, tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem",
                               metrics_host="127.0.0.1", metrics_port=free_port(), max_messages=4,
                               cors_origins=("https://dash.example",))
    gateway = BackgroundGateway(Gateway(settings, gw.fleet, TokenStore(tokens)))
    try:
        assert gateway.url.startswith("https://")
        trust = ssl.create_default_context(cafile=tmp_path / "cert.pem")
        with httpx.Client(verify=trust, headers={"Authorization": f"Bearer {secret}"}) as web:
            # CORS: a listed origin gets its header and a preflight; any other gets neither
            listed = web.get(f"{gateway.url}/v1/models", headers={"Origin": "https://dash.example"})
            assert listed.status_code == 200 and listed.headers["Access-Control-Allow-Origin"] == "https://dash.example"
            other = web.get(f"{gateway.url}/v1/models", headers={"Origin": "https://evil.example"})
            assert "Access-Control-Allow-Origin" not in other.headers
            assert web.options(f"{gateway.url}/v1/chat/completions", headers={"Origin": "https://dash.example"}).status_code == 204
            assert web.options(f"{gateway.url}/v1/chat/completions", headers={"Origin": "https://evil.example"}).status_code == 403
            too_many = web.post(f"{gateway.url}/v1/chat/completions", json={"model": gw.device, "messages": ask("x") * 5})
            assert too_many.status_code == 400 and "at most 4" in too_many.json()["error"]["message"]
            # two requests a minute: the third is refused, with when to retry
            body = {"model": gw.device, "messages": ask("hi"), "max_tokens": 1}
            assert [web.post(f"{gateway.url}/v1/chat/completions", json=body).status_code for _ in range(2)] == [200, 200]
            refused = web.post(f"{gateway.url}/v1/chat/completions", json=body)
            assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= 61
        # the separate metrics listener needs no token
        scraped = httpx.get(f"{gateway.urls[1]}/metrics")
        assert scraped.status_code == 200 and "edgekit_device_up" in scraped.text
    finally:
        gateway.stop()


def test_a_pool_with_no_room_answers_429(gw: Fixture, fleet_client: DeviceClient) -> None:
    # a member that is online by its status but subscribes to nothing: the broker has no taker (reason 0x10)
    device, pool = f"phantom-{uuid.uuid4().hex[:6]}", f"full-{uuid.uuid4().hex[:6]}"
    topic = DeviceTopics.of("edgekit", device).status
    fleet_client.publish(topic, Status(device, "online", "0", "b", "m", "host", 512, {}, time.time(), pools=(pool,)).encode())
    time.sleep(0.3)
    try:
        with pytest.raises(openai.RateLimitError) as full:
            gw.openai().chat.completions.create(model=f"pool:{pool}", messages=ask("hi"), max_tokens=2)
        assert full.value.code == "busy" and "no member took the request" in full.value.message
        assert int(full.value.response.headers["Retry-After"]) > 0
    finally:
        fleet_client.publish(topic, b"")


def test_the_command_serves_the_fleet_and_logs_json(gw: Fixture, broker: int, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    with log.open("w") as sink:
        process = subprocess.Popen([str(Path(sys.executable).parent / "edgekit"), "gateway", "run", "--http-port", str(port),
                                    "--port", str(broker), "--log-format", "json", "-v"], stdout=sink, stderr=sink)
    try:
        assert wait_for_port(port, process, timeout=60), log.read_text()
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert gw.device in {m["id"] for m in listed["data"]}
    finally:
        process.terminate()
        process.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line["path"] == "/v1/models" and line["status"] == 200 for line in lines), log.read_text()


def test_thinking_arrives_apart_from_the_answer(gw: Fixture, fleet_client: DeviceClient) -> None:
    # on the wire: the thinking block's chunks are marked, valid against the v1 schema
    schema = json.loads((Path(__file__).parent.parent / "docs" / "schema" / "v1" / "chunk.json").read_text())
    request_id = fleet_client.send(gw.device, {"messages": ask("Why is the sky blue?"), "max_tokens": 12, "thinking": True})
    chunks = [r for r in fleet_client.replies(request_id, timeout=60) if r["type"] == "chunk"]
    assert chunks and chunks[0].get("reasoning") is True
    for chunk in chunks:
        jsonschema.validate(chunk, schema)
    wire_reasoning = "".join(c["text"] for c in chunks if c.get("reasoning"))
    wire_text = "".join(c["text"] for c in chunks if not c.get("reasoning"))
    assert "</think>" not in wire_reasoning + wire_text
    # OpenAI's shape: reasoning_content, streamed and not, the same greedy tokens
    client = gw.openai()
    whole = client.chat.completions.create(model=gw.device, messages=ask("Why is the sky blue?"), max_tokens=12,
                                           extra_body={"thinking": True}).model_dump()["choices"][0]["message"]
    assert whole["reasoning_content"] == wire_reasoning and (whole["content"] or "") == wire_text
    deltas = [c.choices[0].delta.model_dump() for c in client.chat.completions.create(
        model=gw.device, messages=ask("Why is the sky blue?"), max_tokens=12, extra_body={"thinking": True}, stream=True)]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == wire_reasoning
    # Ollama's: message.thinking, as Home Assistant reads it with think=True
    tokens = gw.tokens_file.parent / "ollama-tokens.yaml"
    add_grant(tokens, "ha", (), 0, 0, networks=("127.0.0.1/32",))
    gateway = BackgroundGateway(Gateway(GatewaySettings(port=0, tokens=tokens), gw.fleet, TokenStore(tokens)))
    try:
        reply = ollama.Client(host=gateway.url).chat(model=gw.device, messages=ask("Why is the sky blue?"), think=True,
                                                     stream=False, options={"num_predict": 12})
        assert reply["message"]["thinking"] == wire_reasoning and reply["message"]["content"] == wire_text
    finally:
        gateway.stop()


def test_a_token_file_that_turns_invalid_refuses_everyone(gw: Fixture, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = tmp_path / "tokens.yaml"
    secret = add_grant(tokens, "solo", (), 0, 0)
    gateway = BackgroundGateway(Gateway(GatewaySettings(port=0, tokens=tokens), gw.fleet, TokenStore(tokens)))
    try:
        assert _status(f"{gateway.url}/v1/models", secret) == 200
        tokens.write_text(tokens.read_text() + "  - name: broken\n")  # an edit that breaks the file
        with caplog.at_level(logging.ERROR, logger="edgekit.gateway"):
            assert _status(f"{gateway.url}/v1/models", secret) == 503
        assert any(r.getMessage().startswith(f"token file: {tokens}") for r in caplog.records), caplog.text
    finally:
        gateway.stop()


def test_images_pass_through_openai_and_ollama(gw: Fixture, fleet_client: DeviceClient) -> None:
    """Data-URL image parts reach the device as sent (Ollama's bare base64 images become them); a
    remote URL is refused by the gateway, which fetches nothing."""
    png = encoded(sample_image(64, 64, 1))
    url = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    question = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]
    reply = gw.openai().chat.completions.create(model=gw.device, messages=[{"role": "user", "content": question}], max_tokens=6)
    direct = fleet_client.chat(gw.device, {"messages": [{"role": "user", "content": [question[0], image_part(png)]}],
                                           "max_tokens": 6})
    assert reply.choices[0].message.content == direct.text
    assert reply.usage.prompt_tokens == direct.final["usage"]["prompt_tokens"] > direct.final["usage"]["image_tokens"] > 0
    with pytest.raises(openai.BadRequestError, match="fetches no remote image"):
        gw.openai().chat.completions.create(model=gw.device, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="not an image"):
        gw.openai().chat.completions.create(model=gw.device, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}])
    client = ollama.Client(host=gw.gateway.url, headers={"Authorization": f"Bearer {gw.secrets['alice']}"})
    answer = client.chat(model=gw.device, messages=[{"role": "user", "content": "What is this?", "images": [png]}],
                         stream=False, options={"num_predict": 6, "temperature": 0})
    assert answer["message"]["content"] == fleet_client.chat(gw.device, {"messages": [{"role": "user", "content": [
        image_part(png), {"type": "text", "text": "What is this?"}]}], "max_tokens": 6}).text
