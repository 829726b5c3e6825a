"""The on-device daemon: answers prompts arriving on MQTT, streaming tokens back.

One generation at a time from a bounded queue; a full queue answers ``busy`` at once. Replies go
to the MQTT 5 ResponseTopic (with its CorrelationData) or to the payload's ``reply_to``, and only
under the allowed reply prefix. Status is retained, with a Last Will that marks the device offline.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit import __version__, signing
from edgekit.agent.grammar import GrammarCompiler
from edgekit.agent.tools import ToolCall, ToolError
from edgekit.errors import BelowQualityGate, ContextExceeded, EdgekitError
from edgekit.mqtt import protocol
from edgekit.mqtt.connection import negotiate_protocol, new_client
from edgekit.mqtt.protocol import UPLOAD_REF, ProtocolError, Request
from edgekit.mqtt.settings import MqttVersion
from edgekit.mqtt.topics import DeviceTopics, HomeAssistantTopics, PoolTopics
from edgekit.runtime.conversation import SessionEvicted, Turn, VisionUnavailable, run_turn
from edgekit.runtime.engine import Engine
from edgekit.runtime.images import ImageError, ImageLimits, Patches, load_rgb, preprocess
from edgekit.runtime.quality_check import DeviceQuality
from edgekit.runtime.resident import tune_allocator
from edgekit.runtime.sessions import SessionStore
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.runtime.vision import VISION_GRAPH, VisionEncoder
from edgekit.serve import discovery, quality_gate
from edgekit.serve.config import DaemonConfig
from edgekit.serve.systemd import notify, watchdog_interval
from edgekit.serve.telemetry import InferenceMetrics, collect, temperature
from edgekit.serve.uploads import UploadStore, reply_scope

log = logging.getLogger("edgekit.serve")
# Places beyond queue_size for pool requests that arrive after the device left its pools: the broker
# may deliver a few before it has the unsubscribe (docs/protocol.md, "Pools").
POOL_SLACK = 2
TRIM_AFTER_IDLE_S = 5.0
# The grammar's tokenizer index goes after this long without a constrained request: a tool loop's
# rounds (the client runs each call in between) keep it; an idle device gets its 31 MiB back.
GRAMMAR_IDLE_S = 60.0


@dataclass
class _Job:
    request: Request
    reply_topic: str | None  # None: a prompt from Home Assistant, answered on the device's answer topic
    correlation: bytes | None
    answer: list[str] | None = None  # the reply's text, collected for that answer
    cancelled: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False


class Daemon:
    """Loads a verified bundle and serves it over MQTT until stopped."""

    def __init__(self, config: DaemonConfig) -> None:
        if config.broker.protocol is MqttVersion.AUTO:
            # The config checks again that pools have MQTT 5's shared subscriptions, now that it is known.
            config = replace(config, broker=negotiate_protocol(config.broker))
            log.info("broker speaks MQTT %s", config.broker.protocol)
        self.device_id = config.device_id or socket.gethostname()
        self.config = config = replace(config, device_id=self.device_id)
        self.manifest = signing.verify(config.bundle, config.trusted_keys)
        # Tokenizer first: parsing tokenizer.json leaves small holes in the heap that the engine's
        # load then fills instead of growing it.
        tune_allocator()
        self.tokenizer = ChatTokenizer(config.bundle)
        self.engine = Engine(config.bundle, threads=config.threads, speculative=config.speculative,
                             prefill_chunk=config.prefill_chunk)
        self.grammars = GrammarCompiler(self.tokenizer, self.engine.vocab_size, self.engine.eos_ids)
        # The vision encoder loads on the first image (VisionEncoder): text-only traffic never pays for it.
        # Images are resized to at most the pixels the bundle's profile allows on this device.
        cap = self.manifest.vision.max_pixels if self.manifest.vision else None
        self.vision = (VisionEncoder(config.bundle, config.threads, cap, self.engine.providers)
                       if (config.bundle / VISION_GRAPH).is_file() and self.engine.takes_embeddings else None)
        self.limits = protocol.RequestLimits(
            images=ImageLimits(config.max_image_bytes, config.max_image_pixels) if self.vision else None,
            max_images=config.max_images)
        self.uploads: UploadStore | None = None
        if self.limits.images is not None:
            self.uploads = UploadStore(self.limits.images, config.upload_ttl_s, config.upload_memory_mb * 1024**2,
                                       config.upload_client_mb * 1024**2)
        self._self_test()
        quality = self._check_quality()
        self.sessions = SessionStore(config.session_memory_mb * 1024**2, config.session_idle_s)
        self.topics = DeviceTopics.of(config.broker.prefix, self.device_id)
        self.pool_topics = [PoolTopics.of(config.broker.prefix, pool) for pool in config.pools]
        self.cancel_topics = {self.topics.cancel, *(p.cancel for p in self.pool_topics)}
        self.pool_requests = {p.request for p in self.pool_topics}
        self.ha = HomeAssistantTopics.of(config.broker.prefix, config.discovery_prefix, self.device_id)
        # Pool requests the broker delivers after this device left its pools (a full queue) are still
        # served: the queue has POOL_SLACK more places for them (docs/protocol.md, "Pools").
        self.jobs: queue.Queue[_Job] = queue.Queue(maxsize=config.queue_size + (POOL_SLACK if config.pools else 0))
        self.in_pools = True  # subscribed to the pools' shared subscriptions (left while the queue is full)
        self._pool_lock = threading.Lock()
        self.active: _Job | None = None
        self.accepting = True
        self.seen: OrderedDict[str, float] = OrderedDict()  # request ids already taken: redelivery is harmless
        self.metrics = InferenceMetrics()
        self.last_sample: dict[str, Any] = {}  # the latest telemetry, also what the optional /metrics serves
        self.started = time.time()
        self.status = protocol.Status(
            device_id=self.device_id, state="offline", version=__version__, bundle=self.manifest.name,
            model=discovery.public_model_name(self.manifest.model.id, self.manifest.model.revision),
            profile=self.manifest.profile.name, context_length=self.engine.context_length,
            capabilities={"sessions": True, "thinking": True, "mqtt5": self.v5, "vision": self.vision is not None},
            since=self.started,
            quality=None if quality is None else {**quality.to_dict(), "serving_below_gate": not quality.passed},
            pools=config.pools, int4_layout=self.engine.int4_kernel)
        if self.engine.int4_fallback is not None:
            log.warning("this bundle's Int4Layout graph cannot run here (%s): serving its MatMulNBits graph", self.engine.int4_fallback)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._worker: threading.Thread | None = None
        self.client = new_client(config.broker, f"edgekit-{self.device_id}", clean_session=None if self.v5 else False)
        self.client.will_set(self.topics.status, self.status.encode(), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)

    def _self_test(self) -> None:
        """Generate one token before announcing online, so a bundle this device cannot run never looks healthy."""
        try:
            list(self.engine.generate(self.tokenizer.encode("ping"), max_new_tokens=1))
        except Exception as exc:
            raise EdgekitError(f"self-test failed: cannot generate from {self.config.bundle} ({type(exc).__name__}: {exc})") from exc

    def _check_quality(self) -> DeviceQuality | None:
        """The bundle against its shipped reference on this device's kernels (cached between starts);
        below the bundle's gate the daemon does not start unless the config says to serve anyway."""
        notify("STATUS=checking the bundle's quality on this device")
        # Fed on every step: the check takes seconds on a Pi 4, inside the unit's start and watchdog timeouts.
        quality = quality_gate.measure(self.config.bundle, self.manifest, self.engine, self.config.cache_dir,
                                       tick=lambda: notify("WATCHDOG=1"))
        if quality is None:
            log.warning("%s ships no quality reference (built by an older edgekit): not checked on this device",
                        self.config.bundle)
        elif not quality.passed:
            where = f"{self.config.bundle} on this device ({quality.checked_on}, ONNX Runtime {quality.onnxruntime})"
            if not self.config.serve_below_quality_gate:
                raise BelowQualityGate(f"{where} is below its quality gate: {quality.reason}. Build it with a more "
                                       "accurate recipe (docs/quality.md), or set serve_below_quality_gate: true in "
                                       "the daemon config to serve it anyway")
            log.warning("%s is below its quality gate (%s); serving anyway, as the config says", where, quality.reason)
        else:
            log.info("quality on this device: %s (%.1f s%s)", quality.reason, quality.seconds,
                     ", cached" if quality.cached else "")
        return quality

    # --- MQTT plumbing -------------------------------------------------------------------------

    @property
    def v5(self) -> bool:
        return self.config.broker.protocol is MqttVersion.V5

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        subscriptions = [(self.topics.request, 1), (self.topics.cancel, 1)]
        for pool in self.pool_topics:
            subscriptions += [(pool.shared_request, 1), (pool.cancel, 1)] if self.in_pools else [(pool.cancel, 1)]
        if self.config.discovery:
            subscriptions.append((self.ha.prompt, 1))
        if self.uploads is not None:
            subscriptions.append((f"{self.topics.images}/#", 1))
        client.subscribe(subscriptions)
        client.publish(self.topics.status, self.status.with_state("online").encode(), qos=1, retain=True)
        # Home Assistant discovery; switched off, an empty retained config removes what an earlier start announced.
        announce = discovery.config(self.config.broker.prefix, self.config.discovery_prefix, self.device_id, self.status.model,
                                    self.status.profile, self.status.bundle, has_temperature=temperature() is not None)
        client.publish(self.ha.config, json.dumps(announce) if self.config.discovery else b"", qos=1, retain=True)
        notify(f"READY=1\nSTATUS=serving {self.manifest.name} as {self.device_id}")
        log.info("connected to %s as %s", self.config.broker.address, self.device_id)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            if message.topic in self.cancel_topics:
                self._cancel(message.payload)
            elif message.topic == self.ha.prompt:
                self._prompt(message.payload)
            elif message.topic.startswith(self.topics.images + "/"):
                self._upload(message)
            else:
                self._accept(message)
        except Exception:  # a bad message must never stop the daemon
            log.exception("failed to handle a message on %s", message.topic)

    def _error(self, topic: str | None, correlation: bytes | None, request_id: str | None, code: str, message: str) -> None:
        """Answer a request with an error message (QoS 1, like every final); a Home Assistant prompt's
        error becomes its answer."""
        if topic is None:
            return self._answer(discovery.answer(request_id or "", "", "error", 0, error=f"{code}: {message}"))
        self._publish(topic, protocol.error(request_id, code, message), correlation, qos=1)

    def _answer(self, body: dict[str, Any]) -> None:
        self.client.publish(self.ha.answer, json.dumps(body, ensure_ascii=False), qos=1, retain=True)

    def _publish(self, topic: str | None, payload: bytes, correlation: bytes | None, qos: int = 0) -> None:
        if topic is None:  # a Home Assistant prompt streams nothing: its answer comes whole
            return
        properties = None
        if self.v5 and correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        self.client.publish(topic, payload, qos=qos, properties=properties)

    # --- requests ------------------------------------------------------------------------------

    def _accept(self, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props else None
        allowed = self.config.broker.reply_prefix
        try:
            request = protocol.parse_request(message.payload, self.limits)
        except ProtocolError as exc:
            # An oversized payload is not parsed at all: only an MQTT 5 response topic can be answered.
            topic, why = protocol.reply_topic(response_topic, exc.reply_to, allowed)
            log.warning("rejected request %s: %s", exc.request_id, exc.message)
            if topic:
                self._error(topic, correlation, exc.request_id, exc.code, exc.message)
            else:
                log.warning("the refusal of request %s is not sent: %s", exc.request_id, why)
            return
        reply_topic, why = protocol.reply_topic(response_topic, request.reply_to, allowed)
        if not reply_topic:
            log.warning("request %s dropped: %s", request.id, why)
            return
        if any(isinstance(image, str) for image in request.images):
            try:
                request.images = self._uploaded(request.images, reply_scope(reply_topic, allowed))
            except ImageError as exc:
                return self._error(reply_topic, correlation, request.id, "bad_request", str(exc))
        with self._lock:
            if request.id in self.seen:
                log.info("request %s already taken; ignoring the redelivery", request.id)
                return
            self.seen[request.id] = time.time()
            while len(self.seen) > 4096:
                self.seen.popitem(last=False)
        self.metrics.count("requests")
        if expiry is not None and request.deadline is None:
            request.deadline = time.time() + expiry
        self._enqueue(_Job(request, reply_topic, correlation), via_pool=message.topic in self.pool_requests)

    def _upload(self, message: mqtt.MQTTMessage) -> None:
        """Keep an image a client uploaded for its later requests (serve/uploads.py); a refusal is
        logged here and told to the request that names the image."""
        scope, _, digest = message.topic[len(self.topics.images) + 1:].rpartition("/")
        if self.uploads is None or not scope:
            log.warning("upload on %s ignored: %s", message.topic,
                        "this bundle takes no images" if self.uploads is None else "no client scope in the topic")
            return
        try:
            self.uploads.put(scope, digest, bytes(message.payload))
        except ImageError as exc:
            log.warning("%s", exc)

    def _uploaded(self, images: list[bytes | str], scope: str) -> list[bytes | str]:
        """A request's images with each upload reference replaced by the upload's bytes."""
        if self.uploads is None:
            raise ImageError("this bundle takes no images")
        return [self.uploads.get(scope, image[len(UPLOAD_REF):]) if isinstance(image, str) else image for image in images]

    def _prompt(self, payload: bytes | bytearray) -> None:
        """A plain-text prompt from Home Assistant's notify entity; the answer is published retained."""
        request_id = uuid.uuid4().hex
        try:
            text = bytes(payload).decode()
        except UnicodeDecodeError:
            text = ""
        if not text.strip() or len(payload) > discovery.PROMPT_MAX:
            why = f"a prompt must be UTF-8 text of 1-{discovery.PROMPT_MAX} bytes (got {len(payload)} bytes)"
            log.warning("prompt on %s refused: %s", self.ha.prompt, why)
            return self._error(None, None, request_id, "bad_request", why)
        request = Request(id=request_id, messages=[{"role": "user", "content": text}])
        self._enqueue(_Job(request, None, None, answer=[]))

    def _enqueue(self, job: _Job, via_pool: bool = False) -> None:
        """Queue a request, or refuse it: the daemon is stopping, short of memory, or its queue is full
        (a pool request may take the slack places). A full queue takes the device out of its pools."""
        request = job.request

        def refuse(code: str, text: str) -> None:
            self.metrics.count("errors")
            self._error(job.reply_topic, job.correlation, request.id, code, text)

        if not self.accepting:
            return refuse("shutting_down", "the daemon is stopping")
        available = psutil.virtual_memory().available
        if available < self.config.min_available_mb * 1024**2:
            return refuse("resources", f"only {available // 1024**2} MiB available (guard: {self.config.min_available_mb} MiB)")
        if self.jobs.qsize() >= self.config.queue_size and not via_pool:
            return refuse("busy", f"queue full ({self.config.queue_size} waiting); retry later")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return refuse("busy", f"queue full ({self.config.queue_size} waiting, and the pool slack of {POOL_SLACK}); retry later")
        # Waiting for a turn: an idle worker is about to take the request just queued.
        if self.jobs.qsize() - (self.active is None) >= self.config.queue_size:
            self._pools(join=False)
        position = self.jobs.qsize() + (1 if self.active else 0)
        self._publish(job.reply_topic, protocol.queued(request.id, position), job.correlation)

    def _pools(self, join: bool) -> None:
        """Leave the pools' shared subscriptions (so that the broker hands their requests to members with
        room: it round-robins whatever their load), or join them again."""
        if not self.pool_topics:
            return
        with self._pool_lock:
            if self.in_pools == join:
                return
            self.in_pools = join
            shared = [pool.shared_request for pool in self.pool_topics]
            if join:
                self.client.subscribe([(topic, 1) for topic in shared])
            else:
                self.client.unsubscribe(shared)
        log.info("%s pools %s (%d waiting)", "joined" if join else "left", ", ".join(self.config.pools), self.jobs.qsize())

    def _cancel(self, payload: bytes | bytearray) -> None:
        request_id = protocol.parse_cancel(payload)
        if request_id is None:
            log.warning("cancel needs a JSON object with a string 'id'; got %r", payload[:100])
            return
        active = self.active
        if active and active.request.id == request_id:
            active.cancelled.set()
            return
        with self.jobs.mutex:
            for job in self.jobs.queue:
                if job.request.id == request_id:
                    job.cancelled.set()

    def _run(self, job: _Job) -> None:
        request, topic, correlation = job.request, job.reply_topic, job.correlation
        if job.cancelled.is_set():
            return self._error(topic, correlation, request.id, "cancelled", "cancelled while queued")
        if request.deadline is not None and time.time() > request.deadline:
            return self._error(topic, correlation, request.id, "expired", "deadline passed before the request ran")
        queue_wait = time.time() - request.received_at
        seq = 0

        def on_text(text: str) -> None:
            nonlocal seq
            self._publish(topic, protocol.chunk(request.id, seq, text), correlation)
            if job.answer is not None:
                job.answer.append(text)
            seq += 1

        def on_reasoning(text: str) -> None:
            nonlocal seq
            self._publish(topic, protocol.chunk(request.id, seq, text, reasoning=True), correlation)
            seq += 1

        def on_call(index: int, call: ToolCall) -> None:
            nonlocal seq
            self._publish(topic, protocol.tool_call(request.id, seq, index, call), correlation)
            seq += 1

        try:
            images = self._images(request)
        except ImageError as exc:
            return self._error(topic, correlation, request.id, "bad_request", str(exc))
        turn = Turn(messages=request.messages, prompt=request.prompt, max_tokens=request.max_tokens,
                    sampling=request.sampling, stop=request.stop, thinking=request.thinking,
                    session=request.session, new_session=request.new_session, speculative=request.speculative,
                    fmt=request.fmt, images=images)
        try:
            result = run_turn(self.engine, self.tokenizer, turn, on_text, job.cancelled.is_set, self.sessions,
                              self.grammars, on_call, on_reasoning, self.vision)
        except (ToolError, VisionUnavailable) as exc:
            return self._error(topic, correlation, request.id, "bad_request", str(exc))
        except SessionEvicted as exc:
            return self._error(topic, correlation, request.id, "session_evicted", str(exc))
        except ContextExceeded as exc:
            return self._error(topic, correlation, request.id, "context_exceeded", str(exc))
        except EdgekitError as exc:
            return self._error(topic, correlation, request.id, "internal", str(exc))
        stats = result.stats
        finish = "shutdown" if job.shutdown else result.finish_reason
        self.metrics.finished(stats)
        self._publish(topic, protocol.final(
            request.id, seq, finish,
            usage={"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                   "session_tokens": result.session_tokens, "tools_tokens": result.tools_tokens,
                   "image_tokens": result.image_tokens},
            timings={"queue_s": round(queue_wait, 4), "time_to_first_token_s": round(stats.prefill_s, 4),
                     "prefill_tokens_per_s": round(stats.prefill_tps, 1),
                     "decode_tokens_per_s": round(stats.decode_tps, 1), **stats.drafting(),
                     "grammar_ms_per_token": result.grammar_ms_per_token},
            session=request.session, device_id=self.device_id, tool_calls=result.tool_calls), correlation, qos=1)
        if job.answer is not None:
            self._answer(discovery.answer(request.id, "".join(job.answer), finish, stats.completion_tokens))

    def _images(self, request: Request) -> list[Patches]:
        """Decode and cut the request's images (their headers were checked when it arrived)."""
        if not request.images:
            return []
        limits, vision = self.limits.images, self.vision
        assert limits is not None and vision is not None  # parse_request refuses images otherwise
        # Upload references were resolved to bytes when the request arrived (_accept).
        return [preprocess(load_rgb(data, limits, f"image {i + 1}"), vision.processing)
                for i, data in enumerate(request.images) if isinstance(data, bytes)]

    def _report(self) -> None:
        # psutil's first cpu_percent() reads 0, and the total and per-core readings keep apart baselines:
        # prime both, so that the first message is meaningful.
        psutil.cpu_percent()
        psutil.cpu_percent(percpu=True)
        while not self._stopped.wait(self.config.telemetry_interval):
            if self.client.is_connected():
                sample = self.last_sample = collect(self.config.bundle, self.started, self.metrics, self.jobs.qsize())
                self.client.publish(self.topics.telemetry, protocol.telemetry(sample), qos=0, retain=True)

    def _watchdog(self, interval: float) -> None:
        # Ping only while the worker thread lives: a wedged or dead worker lets systemd restart us.
        while not self._stopped.wait(interval):
            if self._worker is not None and self._worker.is_alive():
                notify("WATCHDOG=1")

    def _work(self) -> None:
        # When the last job ended, until the heap is trimmed. The start-up self-test and quality check
        # count as one: the heap they freed (about 30 MiB on the 0.8B) goes back once the device is idle.
        last_job: float | None = time.monotonic()
        while not self._stopped.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                # Trim the heap once the device has been idle for a while: trimming right after a
                # request delayed the next first token (the release after each job is cheap).
                if last_job is not None and time.monotonic() - last_job > TRIM_AFTER_IDLE_S:
                    self.engine.release_memory()
                    last_job = None
                self.grammars.release(idle_s=GRAMMAR_IDLE_S)
                if self.vision is not None and self.vision.release_if_idle(self.config.vision_idle_s):
                    self.engine.release_memory()
                continue
            self.active = job
            if self.jobs.qsize() <= self.config.queue_size // 2:
                self._pools(join=True)  # hysteresis: back once half the queue is free, not at the first free place
            try:
                self._run(job)
            except Exception:
                log.exception("request %s failed", job.request.id)
                self._error(job.reply_topic, job.correlation, job.request.id, "internal", "unexpected error")
            finally:
                self.active = None
                last_job = time.monotonic()
            if self.jobs.empty():
                # The embedding pages this request's tokens mapped; nothing to do
                # when the engine reads embedding rows itself (bundles with model.embeds.onnx).
                self.engine.release_memory(heap=False)

    # --- lifecycle ------------------------------------------------------------------------------

    def serve(self, handle_signals: bool = True) -> None:
        """Connect and serve until :meth:`stop` (SIGTERM/SIGINT when ``handle_signals``); then end
        in-flight work with a final message, answer queued requests, publish offline and return."""
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        worker = self._worker = threading.Thread(target=self._work, name="edgekit-worker", daemon=True)
        worker.start()
        threading.Thread(target=self._report, name="edgekit-telemetry", daemon=True).start()
        stop_metrics = None
        if self.config.metrics_port is not None:
            from edgekit.device_metrics import serve_on_loopback

            stop_metrics = serve_on_loopback(self.config.metrics_port, lambda: {
                self.device_id: {**asdict(self.status), "telemetry": self.last_sample,
                                 "state": "online" if self.accepting and self.client.is_connected() else "offline"}})
        if (interval := watchdog_interval()) is not None:
            threading.Thread(target=self._watchdog, args=(interval,), name="edgekit-watchdog", daemon=True).start()
        connect_props = None
        if self.v5:
            # A persistent session: requests published while we are away wait on the broker.
            connect_props = Properties(PacketTypes.CONNECT)
            connect_props.SessionExpiryInterval = 24 * 3600
        self.client.connect_async(self.config.broker.host, self.config.broker.port, keepalive=30,
                                  clean_start=False if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                  properties=connect_props)
        self.client.loop_start()
        self._stopped.wait()
        notify("STOPPING=1")
        self.accepting = False
        # Out of the pools first: the broker keeps a persistent session's shared subscriptions while it is
        # away, and would go on handing this device its share of pool requests.
        self._pools(join=False)
        if self.active:
            self.active.shutdown = True
            self.active.cancelled.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            self._error(job.reply_topic, job.correlation, job.request.id, "shutting_down", "the daemon is stopping")
        worker.join(timeout=30)
        info = self.client.publish(self.topics.status, self.status.encode(), qos=1, retain=True)
        info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
        if stop_metrics:
            stop_metrics()

    def stop(self) -> None:
        self._stopped.set()

