"""The MQTT daemon against a real Mosquitto broker started by the test on a free port."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.client import DeviceClient, PoolFull
from edgekit.errors import EdgekitError
from edgekit.runtime.engine import Engine
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.serve.daemon import Daemon, DaemonConfig

from .conftest import Mosquitto, broker_at, start_daemon


def test_pool_request_reaches_exactly_one_device(host_bundle: Path, broker: int) -> None:
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    members = [start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=f"{pool}-{i}", pools=(pool,),
                                   queue_size=8)) for i in range(2)]
    try:
        with DeviceClient(broker_at(broker)) as client:
            ids = [client.send(None, {"prompt": f"job {i}", "max_tokens": 2}, pool=pool) for i in range(8)]
            finals = [[r for r in client.replies(i, timeout=60) if r["type"] == "final"] for i in ids]
            with pytest.raises(EdgekitError, match="no final reply"):
                list(client.replies(ids[0], timeout=1.5))  # no second device answered it too
    finally:
        for instance, thread in members:
            instance.stop()
            thread.join(timeout=30)
    assert all(len(f) == 1 for f in finals)
    served_by = {f[0]["device_id"] for f in finals}
    assert served_by == {f"{pool}-0", f"{pool}-1"}  # the broker spread the work over both


def _greedy_text(bundle: Path, content: str, max_tokens: int) -> str:
    tokenizer = ChatTokenizer(bundle)
    engine = Engine(bundle)
    ids = tokenizer.encode(tokenizer.render([{"role": "user", "content": content}], thinking=False))
    tokens = [t for t in engine.generate(ids, max_tokens) if t not in engine.eos_ids]
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_streams_chunks_then_final(daemon: Daemon, broker: int, host_bundle: Path, version: str) -> None:
    with DeviceClient(broker_at(broker, protocol=version)) as client:
        request_id = client.send(daemon.config.device_id, {"messages": [{"role": "user", "content": "Hello"}],
                                                          "max_tokens": 12})
        replies = list(client.replies(request_id, timeout=60))
    chunks = [r for r in replies if r["type"] == "chunk"]
    final = replies[-1]
    assert final["type"] == "final" and final["usage"]["completion_tokens"] == 12
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and final["seq"] == len(chunks)
    assert "".join(c["text"] for c in chunks) == _greedy_text(host_bundle, "Hello", 12)
    assert replies[0]["type"] == "queued" and replies[0]["position"] == 1


def test_bad_input_gets_error_and_daemon_keeps_serving(daemon: Daemon, broker: int,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    device = daemon.config.device_id
    topic = f"edgekit/v1/{device}/request"
    relayed: list[mqtt.MQTTMessage] = []
    with DeviceClient(broker_at(broker, protocol="3.1.1")) as client, caplog.at_level(logging.WARNING, "edgekit.serve"):
        reply_to = f"{client.reply_base}/bad"
        raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        raw.on_message = lambda c, u, m: relayed.append(m)
        raw.connect("127.0.0.1", broker)
        raw.loop_start()
        raw.subscribe([("home/#", 1), ("edgekit/v1/replies/#", 1)])
        time.sleep(0.3)
        for payload in (
            b"{not json",  # nothing to answer on: refused in the log
            json.dumps({"id": "u1", "prompt": "x", "colour": 1, "reply_to": reply_to}).encode(),
            json.dumps({"id": "t1", "prompt": "x", "max_tokens": "many", "reply_to": reply_to}).encode(),
            # A reply topic outside the allowed prefix: dropped, never relayed.
            json.dumps({"id": "r1", "prompt": "x", "reply_to": "home/alarm/disarm"}).encode(),
            # Inside the prefix but not a topic one can publish to: refused without a publish attempt.
            json.dumps({"id": "w1", "prompt": "x", "reply_to": "edgekit/v1/replies/x/#"}).encode(),
            json.dumps({"id": "e1", "prompt": "x", "reply_to": "edgekit/v1/replies//e1"}).encode(),
        ):
            raw.publish(topic, payload, qos=1).wait_for_publish(5)
        errors = []
        for request_id in ("u1", "t1"):
            errors.extend(client.replies(request_id, timeout=10))
        assert [e["code"] for e in errors] == ["bad_request", "bad_request"]
        assert "field 'max_tokens'" in errors[1]["message"] and "unknown field 'colour'" in errors[0]["message"]
        final = client.ask(device, {"prompt": "still there?", "max_tokens": 2})
        assert final["type"] == "final"
        raw.loop_stop()
        raw.disconnect()
    logged = [r.getMessage() for r in caplog.records]
    assert any("rejected request None: payload is not valid JSON" in line for line in logged), logged
    assert any("request r1 dropped: reply topic 'home/alarm/disarm' is outside edgekit/v1/replies/" in line
               for line in logged), logged
    for request_id, problem in (("w1", "wildcard"), ("e1", "empty level")):
        assert any(f"refusal of request {request_id} is not sent" in line and problem in line for line in logged), logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback from a failed publish
    assert not [m for m in relayed if m.topic.startswith("home/")]
    assert {json.loads(m.payload).get("id") for m in relayed} & {"r1", "w1", "e1"} == set()


def test_oversized_payload_answered_on_mqtt5_response_topic(daemon: Daemon, broker: int) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list[mqtt.MQTTMessage] = []
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.on_message = lambda c, u, m: got.append(m)
    raw.connect("127.0.0.1", broker)
    raw.loop_start()
    raw.subscribe("edgekit/v1/replies/raw/#", qos=1)
    time.sleep(0.3)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "edgekit/v1/replies/raw/big"
    props.CorrelationData = b"corr-1"
    # Over the limit of a device that takes images (the host bundle has an encoder): 256 KiB plus
    # the base64 of its per-request images.
    payload = json.dumps({"id": "big", "prompt": "x" * daemon.limits.max_payload}).encode()
    raw.publish(f"edgekit/v1/{daemon.config.device_id}/request", payload, qos=1, properties=props)
    deadline = time.monotonic() + 10
    while not got:
        assert time.monotonic() < deadline, "no error reply for the oversized request"
        time.sleep(0.05)
    raw.loop_stop()
    raw.disconnect()
    reply = json.loads(got[0].payload)
    assert reply["code"] == "too_large" and got[0].properties.CorrelationData == b"corr-1"


def test_telemetry_reports_resources_and_inference(daemon: Daemon, broker: int) -> None:
    from click.testing import CliRunner

    from edgekit.cli import main

    with DeviceClient(broker_at(broker)) as client:
        client.ask(daemon.config.device_id, {"prompt": "hi", "max_tokens": 3})
        deadline = time.monotonic() + 10
        while True:
            telemetry = client.statuses(0.6).get(daemon.config.device_id, {}).get("telemetry", {})
            if telemetry.get("inference", {}).get("completed", 0) >= 1:
                break
            assert time.monotonic() < deadline, f"no telemetry with the finished request: {telemetry}"
    assert telemetry["memory"]["process_rss_mb"] > 0 and len(telemetry["cpu"]["per_core"]) >= 1
    assert telemetry["inference"]["tokens"] >= 3 and telemetry["inference"]["ttft_p50_s"] > 0
    assert telemetry["disk"]["free_mb"] > 0 and telemetry["uptime_s"] > 0
    listed = CliRunner().invoke(main, ["status", "--port", str(broker), "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)[daemon.config.device_id]["state"] == "online"


def test_redelivered_id_runs_once_and_stale_request_expires(daemon: Daemon, broker: int) -> None:
    device = daemon.config.device_id
    with DeviceClient(broker_at(broker, protocol="3.1.1")) as client:
        topic = f"edgekit/v1/{device}/request"
        payload = json.dumps({"id": "dup-1", "prompt": "once", "max_tokens": 2, "reply_to": f"{client.reply_base}/d"})
        for _ in range(2):  # what a QoS 1 redelivery looks like to the daemon
            client.publish(topic, payload)
        first = list(client.replies("dup-1", timeout=30))
        assert [r["type"] for r in first][0] == "queued" and first[-1]["type"] == "final"
        with pytest.raises(EdgekitError, match="no final reply"):
            list(client.replies("dup-1", timeout=2))  # the copy was not run again
        stale = json.dumps({"id": "old-1", "prompt": "late", "deadline": time.time() - 5,
                            "reply_to": f"{client.reply_base}/o"})
        client.publish(topic, stale)
        *_, last = client.replies("old-1", timeout=30)
        assert last["code"] == "expired"


def test_cancel_mid_stream(daemon: Daemon, broker: int) -> None:
    with DeviceClient(broker_at(broker)) as client:
        request_id = client.send(daemon.config.device_id, {"prompt": "count", "max_tokens": 2000})
        replies = []
        for reply in client.replies(request_id, timeout=60):
            replies.append(reply)
            if reply["type"] == "chunk" and reply["seq"] == 2:
                client.cancel(daemon.config.device_id, request_id)
    assert replies[-1]["type"] == "final" and replies[-1]["finish_reason"] == "cancelled"
    assert replies[-1]["usage"]["completion_tokens"] < 2000


def test_full_queue_answers_busy(daemon: Daemon, broker: int) -> None:
    device = daemon.config.device_id
    with DeviceClient(broker_at(broker)) as client:
        # Long enough that the tiny model (a few hundred tokens a second) is still at it when the
        # third request arrives, however slow the machine is to send it: it gets cancelled.
        running = client.send(device, {"prompt": "long", "max_tokens": 4000})
        stream = client.replies(running, timeout=120)
        assert next(stream)["type"] == "queued"
        assert next(stream)["type"] == "chunk"  # generating: the queue (size 1) is empty again
        waiting = client.send(device, {"prompt": "next", "max_tokens": 4000})
        refused = client.send(device, {"prompt": "one too many", "max_tokens": 400})
        *_, busy = client.replies(refused, timeout=30)
        assert busy["code"] == "busy" and "queue full" in busy["message"]
        queued = next(client.replies(waiting, timeout=30))
        assert queued["type"] == "queued" and queued["position"] == 2
        for request_id in (waiting, running):
            client.cancel(device, request_id)
        *_, last = stream
        assert last["type"] == "final" and last["finish_reason"] == "cancelled"
        *_, dropped = client.replies(waiting, timeout=30)
        assert dropped["code"] == "cancelled"


def test_session_turn_two_is_exact(daemon: Daemon, broker: int, host_bundle: Path) -> None:
    """Turn 2 runs from kept state and matches a fresh engine fed the session's exact token stream."""
    session = f"s-{uuid.uuid4().hex[:6]}"
    with DeviceClient(broker_at(broker)) as client:
        texts, finals = [], []
        for content in ("Hi, I am Ada.", "What is my name?"):
            pieces: list[str] = []
            final = client.ask(daemon.config.device_id, {"messages": [{"role": "user", "content": content}],
                                                         "session": session, "max_tokens": 8}, on_text=pieces.append)
            texts.append("".join(pieces))
            finals.append(final)
        assert final["session"] == session
    kept = daemon.sessions.take(session)
    assert kept is not None and kept.state.length == len(kept.tokens) == final["usage"]["session_tokens"]
    # Replay: a fresh engine fed the session's stream up to turn 2's reply (template, <think> and the
    # end-of-turn tokens included) must generate exactly that reply.
    engine = Engine(host_bundle)
    tokenizer = ChatTokenizer(host_bundle)
    second_prompt_end = len(kept.tokens) - (final["usage"]["completion_tokens"] - 1)
    # Turn 2 ran only its new tokens (closing turn 1 and the new message), not the history.
    assert final["usage"]["prompt_tokens"] == second_prompt_end - finals[0]["usage"]["session_tokens"]
    replay_state = engine.new_state()
    out = list(engine.generate(kept.tokens[:second_prompt_end], final["usage"]["completion_tokens"], state=replay_state))
    assert tokenizer.decode([t for t in out if t not in engine.eos_ids]) == texts[1]
    assert out[:-1] == kept.tokens[second_prompt_end:] and out[-1:] == kept.pending


def test_unknown_evicted_session_says_so(daemon: Daemon, broker: int) -> None:
    daemon.sessions._remember("gone", "expired after 900 s idle")  # what the idle sweep records
    with DeviceClient(broker_at(broker)) as client, pytest.raises(EdgekitError, match="session_evicted"):
        client.ask(daemon.config.device_id, {"prompt": "x", "session": "gone", "max_tokens": 2})


def test_sigterm_finishes_in_flight_and_publishes_offline(host_bundle: Path, broker: int) -> None:
    device = f"term-{uuid.uuid4().hex[:6]}"
    process = _serve_process(host_bundle, broker, device)
    try:
        with DeviceClient(broker_at(broker)) as client:
            client.wait_for_state(device, "online", alive=lambda: process.poll() is None)
            request_id = client.send(device, {"prompt": "go", "max_tokens": 3000})
            replies = client.replies(request_id, timeout=60)
            assert next(replies)["type"] == "queued"
            next(replies)  # the first chunk: generation is under way
            process.send_signal(signal.SIGTERM)
            *_, last = replies
            assert last["type"] == "final" and last["finish_reason"] == "shutdown"
            assert process.wait(timeout=30) == 0
            assert client.statuses(0.5)[device]["state"] == "offline"
    finally:
        if process.poll() is None:
            process.kill()


def test_last_will_marks_a_killed_daemon_offline(host_bundle: Path, broker: int) -> None:
    device = f"kill-{uuid.uuid4().hex[:6]}"
    process = _serve_process(host_bundle, broker, device)
    with DeviceClient(broker_at(broker)) as client:
        client.wait_for_state(device, "online", alive=lambda: process.poll() is None)
        process.kill()
        process.wait()
        # The broker publishes the will once it notices the dead connection (keepalive 30 s x 1.5 at most).
        client.wait_for_state(device, "offline", timeout=60)


def _serve_process(bundle: Path, broker: int, device: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", str(bundle), "--device-id", device,
                             "--port", str(broker)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_requests_sent_while_daemon_is_away_are_served_on_return(host_bundle: Path, broker: int) -> None:
    """The daemon keeps a persistent MQTT session: the broker holds its requests while it is down."""
    device = f"away-{uuid.uuid4().hex[:6]}"
    process = _serve_process(host_bundle, broker, device)
    try:
        with DeviceClient(broker_at(broker)) as client:
            client.wait_for_state(device, "online")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            client.wait_for_state(device, "offline")
            request_id = client.send(device, {"prompt": "while you were out", "max_tokens": 3})
            time.sleep(0.5)
            process = _serve_process(host_bundle, broker, device)
            *_, last = client.replies(request_id, timeout=60)
            assert last["type"] == "final" and last["device_id"] == device
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_broker_restart_mid_stream(host_bundle: Path, tmp_path: Path) -> None:
    """The daemon reconnects with its session; the final message (QoS 1) still arrives."""
    broker = Mosquitto(tmp_path)
    instance, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker.port), device_id="restart"))
    try:
        with DeviceClient(broker_at(broker.port)) as client:
            request_id = client.send("restart", {"prompt": "a long story", "max_tokens": 6000})
            stream = client.replies(request_id, timeout=120)
            assert next(stream)["type"] == "queued" and next(stream)["type"] == "chunk"
            broker.stop()
            time.sleep(0.5)
            broker.start()
            *_, last = stream
            assert last["type"] == "final" and last["usage"]["completion_tokens"] == 6000
            # And the daemon keeps serving on the restarted broker.
            assert client.ask("restart", {"prompt": "again", "max_tokens": 2})["type"] == "final"
    finally:
        instance.stop()
        thread.join(timeout=30)
        broker.stop()


def test_systemd_readiness_and_watchdog(host_bundle: Path, broker: int, tmp_path: Path) -> None:
    """Under systemd (Type=notify, WatchdogSec) the daemon says what it is doing while it starts,
    reports READY=1, then feeds the watchdog."""
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    process = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", str(host_bundle), "--device-id",
                                f"sd-{uuid.uuid4().hex[:6]}", "--port", str(broker)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        before_ready = []
        while not (message := listener.recv(4096).decode()).startswith("READY=1"):
            before_ready.append(message)
        # The quality check runs before READY and feeds the watchdog at every step (none when cached).
        assert before_ready[0] == "STATUS=checking the bundle's quality on this device", before_ready
        assert set(before_ready[1:]) <= {"WATCHDOG=1"}, before_ready
        assert [listener.recv(4096).decode() for _ in range(2)] == ["WATCHDOG=1", "WATCHDOG=1"]
        process.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_embedded_broker_serves_the_demo(kind: str, host_bundle: Path) -> None:
    """make run's broker: Mosquitto (MQTT 5) where installed, else amqtt, which only speaks 3.1.1."""
    from edgekit.serve import embedded_broker

    broker = embedded_broker.start(prefer=kind)
    assert (broker.kind, broker.protocol) == (kind, "5" if kind == "mosquitto" else "3.1.1")
    try:
        # "auto" finds out what the broker speaks: MQTT 5 on Mosquitto, 3.1.1 on amqtt.
        instance, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker.port, protocol="auto"),
                                                     device_id="demo"))
        assert instance.config.broker.protocol == broker.protocol
        try:
            with DeviceClient(broker_at(broker.port, protocol="auto")) as client:
                assert client.v5 == (broker.protocol == "5")
                assert client.ask("demo", {"prompt": "hi", "max_tokens": 3})["usage"]["completion_tokens"] == 3
        finally:
            instance.stop()
            thread.join(timeout=30)
    finally:
        broker.stop()


def test_low_memory_guard_refuses_with_the_numbers(host_bundle: Path, broker: int) -> None:
    """A device short of memory refuses new work, saying how much is available and what the guard is."""
    guarded, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id="tight",
                                                min_available_mb=10**9))
    try:
        with DeviceClient(broker_at(broker)) as client, pytest.raises(EdgekitError, match="resources: only .* MiB available"):
            client.ask("tight", {"prompt": "hi", "max_tokens": 2})
    finally:
        guarded.stop()
        thread.join(timeout=30)


def test_prompt_longer_than_context_is_refused_with_numbers(daemon: Daemon, broker: int) -> None:
    too_long = " a" * (daemon.engine.context_length + 10)
    with DeviceClient(broker_at(broker)) as client:
        with pytest.raises(EdgekitError, match=f"context_exceeded: .*does not fit the bundle's context of "
                                               f"{daemon.engine.context_length} tokens"):
            client.ask(daemon.config.device_id, {"prompt": too_long, "max_tokens": 2})
        assert client.ask(daemon.config.device_id, {"prompt": "short", "max_tokens": 2})["type"] == "final"


def test_mqtt5_message_expiry_answers_expired(daemon: Daemon, broker: int) -> None:
    """A request carrying an MQTT 5 message expiry that passes while it waits in the queue is not run late."""
    device = daemon.config.device_id
    with DeviceClient(broker_at(broker)) as client:
        running = client.send(device, {"prompt": "long", "max_tokens": 4000})
        stream = client.replies(running, timeout=60)
        next(stream), next(stream)  # queued, then the first chunk: the worker is busy
        waiting = client.send(device, {"prompt": "soon stale", "max_tokens": 2}, expiry_s=1)
        assert next(client.replies(waiting, timeout=10))["type"] == "queued"
        time.sleep(1.5)
        client.cancel(device, running)
        *_, last = client.replies(waiting, timeout=30)
        assert last["code"] == "expired"


def test_bench_depths_are_checked_before_measuring(host_bundle: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(main, ["bench", str(host_bundle), "--depths", "0,1k"])
    assert bad.exit_code == 2 and "--depths" in bad.output and "0,1k" in bad.output
    context = json.loads((host_bundle / "genai_config.json").read_text())["model"]["context_length"]
    too_deep = runner.invoke(main, ["bench", str(host_bundle), "--depths", f"0,{context}"])
    assert too_deep.exit_code == 1 and f"do not fit the bundle's context of {context}" in too_deep.output


@pytest.mark.slow
def test_bench_report(host_bundle: Path) -> None:
    """`edgekit bench` runs end to end; its MQTT prompt has the same length as the engine's."""
    from edgekit.bench import run

    report = run(host_bundle, runs=1, prompt_len=32, new_tokens=4, threads=None, progress=lambda _: None, depths=(0, 512))
    assert report["mqtt"]["prompt_tokens"] == 32
    # The depth sweep: decode after 0 and 512 tokens of context (llama-bench's -d).
    assert set(report["depth_decode_tps"]) == {"0", "512"}
    assert all(figures["median"] > 0 for figures in report["depth_decode_tps"].values())
    assert report["direct"]["decode_tps"] > 0 and report["mqtt"]["decode_tps"] > 0
    assert report["daemon_rss_mb"] > 0 and report["session"]["history_tokens"] > 2000
    # Linux: the peak over the full-context request alone (the load-time peak reset first).
    assert 0 < report["daemon_peak_rss_full_context_mb"] <= report["daemon_peak_rss_mb"] + 1024
    assert 0 < report["daemon_anon_rss_full_context_mb"] <= report["daemon_rss_full_context_mb"]
    assert report["session"]["kept_ttft_ms"] < report["session"]["replay_ttft_ms"]
    # What llama-bench records beside its figures, so a figure can be compared later.
    facts = report["machine"]
    assert facts["edgekit"] and facts["onnxruntime"] and facts["cpu"]["model"] and facts["cpu"]["flags"]
    assert facts["threads"] == report["threads"] and len(facts["commit"] or "x" * 40) == 40
    spread = report["spread"]["direct_decode_tps"]
    assert spread["min"] <= report["direct"]["decode_tps"] == spread["median"] <= spread["max"]


def test_pool_members_leave_while_full_so_a_burst_meets_no_busy(host_bundle: Path, broker: int) -> None:
    """Mosquitto hands pool requests round-robin whatever a member's load; a member whose queue is full
    leaves the pool until half its queue is free. A burst within the pool's room meets no `busy`; one
    beyond it is refused at once by the broker (no subscriber), never left unanswered."""
    pool = f"burst-{uuid.uuid4().hex[:6]}"
    members = [start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=f"{pool}-{name}", pools=(pool,),
                                         queue_size=1, threads=threads))
               for name, threads in (("slow", 1), ("fast", 2))]
    try:
        with DeviceClient(broker_at(broker)) as client:
            def burst(count: int) -> tuple[list[dict], int]:
                sent, refused = [], 0
                for i in range(count):
                    try:
                        sent.append(client.send(None, {"prompt": f"job {i}", "max_tokens": 120}, pool=pool))
                    except PoolFull:
                        refused += 1
                return [list(client.replies(request_id, timeout=120))[-1] for request_id in sent], refused

            finals, refused = burst(4)  # two members, each with one running and a queue of one: room for four
            assert refused == 0 and [f["type"] for f in finals] == ["final"] * 4, finals
            spread = Counter(f["device_id"] for f in finals)
            assert set(spread) == {f"{pool}-slow", f"{pool}-fast"}, spread
            # the slow member busy with its own long request: it takes one pool request into its queue and
            # leaves; round-robin would have handed it more, and those would have come back busy
            long = client.send(f"{pool}-slow", {"prompt": "a long one", "max_tokens": 400})
            stream = client.replies(long, timeout=120)
            assert [next(stream)["type"], next(stream)["type"]] == ["queued", "chunk"]
            finals, refused = burst(3)
            assert refused == 0 and [f["type"] for f in finals] == ["final"] * 3, finals
            assert Counter(f["device_id"] for f in finals)[f"{pool}-slow"] <= 1
            assert list(stream)[-1]["type"] == "final"
            finals, refused = burst(16)  # beyond the room of both
            assert refused > 0 and all(f["type"] == "final" for f in finals), finals
            assert len(finals) + refused == 16
            # with room again, both members are back in the pool
            finals, refused = burst(2)
            assert refused == 0 and all(f["type"] == "final" for f in finals)
    finally:
        for daemon, thread in members:
            daemon.stop()
            thread.join(timeout=30)
