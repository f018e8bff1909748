"""The agent's side of MQTT: what device messages do to the state, and back.

The same :class:`MqttGateway` serves the embedded broker and an external one;
only its :class:`Outlet` (how messages reach devices) differs.

Inbound, a device's PUBLISH arrives in :meth:`MqttGateway.received`:

- telemetry (JSON object or CBOR map) and reported state (JSON object) are
  checked, counted and handed to the agent's hooks in ``GatewayContext.hooks``:
  telemetry in batches to ``ingest_telemetry`` (one durable append each, a QoS 1
  PUBACK once it returns), reported state to ``on_reported`` one at a time;
- a status (``online``/``offline``) updates presence;
- a KV topic is a write, submitted to the scope (``Scope.kv_submit``): it
  joins the scope's open put group, the one batching path for KV writes, with
  whatever else arrives with it (other devices' messages, HTTP puts), so one
  device publishing at full speed shares each fsync with everyone else. A QoS 1
  write is acknowledged (PUBACK) only once it is durable, the same promise the
  HTTP API makes, and in the order the writes came.

Outbound, every durable KV change, from any source (MQTT, HTTP, CoAP, the hub),
is announced by ``Scope.listeners``; the changed keys are republished with
their current values on ``konsul/v1/kv/<key>``, a deleted key as an empty
payload. Desired state is republished, retained, whenever the agent calls
``GatewayContext.push.publish_desired(device_id, state)`` (:meth:`install_push`).

Everything here runs on trio. The embedded broker (``server/``) calls the
synchronous methods from its connection tasks; they only touch memory and
set trio events, never block or await.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Protocol

import trio

from konsul.protocols.gateway import AnonymousDevicesFull, AuthError, GatewayContext
from konsul.sync.devices import DeviceRecord, check_device_id
from konsul.sync.errors import KonsulError, StoreError
from konsul.sync.limits import check_value

from . import codec
from .codec import Connect, Publish
from .policy import REFUSAL_CODES, Metrics, PayloadRefused, Refusals, check_status, decode_document
from .topics import KV, TopicRefused, check_publish, check_subscribe, device_topic, kv_topic, literal_prefix, matches, parse_topic
from .topics import event_topic
from .topics import may_receive as topic_may_receive

log = logging.getLogger("konsul.mqtt")

MAX_BATCH = 1000  # telemetry samples per durable append
COMMITS_IN_FLIGHT = 2  # telemetry batches waiting for the store at once (see docs/benchmarks.md, MQTT)
HIGH_WATER = 5000  # queued writes and hook calls past which readers pause
MAX_BACKLOG = 50_000  # past this, QoS 0 input is refused ("overload")
RECEIVED_KINDS = ("telemetry", "reported", "status", "kv_write", "kv_delete")  # konsul_mqtt_messages_received_total

# Called once a message is handled: done(ok) or, for a refused one, done(True, reason), a v5
# reason code for the acknowledgement (policy.REFUSAL_CODES). False: do not acknowledge.
Done = Callable[..., None]


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr call per field, per message
class Outgoing:
    topic: str
    payload: bytes
    retain: bool
    kind: str  # "kv", "desired", "status" or "event": the label of the published metric
    # The agent publishes at QoS 2: each subscriber gets it at the QoS it was granted [MQTT-3.8.4-6].
    qos: int = 2


class Outlet(Protocol):
    """How the gateway reaches devices: the embedded broker, or a client of an external one."""

    async def send(self, messages: list[Outgoing]) -> None: ...

    async def settle(self, results: list[tuple[Done, bool]]) -> None: ...

    async def kick(self, device_id: str, keep_token_hash: str | None = None, why: str = "device deleted") -> None: ...


class MqttGateway:
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.scope = ctx.scope
        self.metrics = Metrics(ctx.registry)
        # The labelled children, looked up once: labels() per message was a few percent of its CPU.
        self._received_count = {kind: self.metrics.received.labels(kind) for kind in RECEIVED_KINDS}
        self.refusals = Refusals(self.metrics)
        self.records: dict[str, DeviceRecord] = {}  # devices admitted since start
        self.links: dict[str, int] = {}  # open connections per device
        self.desired: dict[str, bytes] = {}  # the last desired state published per device
        self.seen_via_broker: set[str] = set()  # online by their status, through an external broker
        # KV writes submitted to the scope and not yet settled, and the results
        # (acknowledge or not) waiting to be handed to the outlet, in order.
        self._kv_unsettled = 0
        self._kv_results: list[tuple[Done, bool]] = []
        self._kv_failed: tuple[int, BaseException | None] = (0, None)  # since the last settle: count, last error
        self._kv_wake = trio.Event()
        self._hook_calls: deque[tuple[Callable[..., Any], tuple, str, Done | None]] = deque()
        self._telemetry: deque[tuple[tuple[str, Any], str, Done | None]] = deque()
        self._telemetry_lot = trio.lowlevel.ParkingLot()  # idle telemetry workers
        self._dirty_keys: dict[str, None] = {}  # insertion-ordered set
        self._outgoing: list[Outgoing] = []
        self._kicks: list[tuple[str, str | None, str]] = []  # (device, token hash still valid, why)
        self.access = ctx.device_access
        self.rate = ctx.device_access.rate("mqtt")
        self._commits = trio.Semaphore(COMMITS_IN_FLIGHT)
        self._hook_wake = trio.Event()
        self._out_wake = trio.Event()
        self.outlet: Outlet | None = None

    # -- admission (embedded broker) --------------------------------------------------

    async def admit(self, connect: Connect, peer: str) -> int:
        """The CONNACK code for a CONNECT: device id, token, Last Will."""
        device_id = connect.client_id
        who = f"{device_id or '?'}@{peer}"
        source = peer.rpartition(":")[0] or peer  # the log limit's key: the client id is the peer's choice
        try:
            check_device_id(device_id)
        except KonsulError as error:
            self.refusals.refuse("auth", who, f"client id must be a device id: {error}", source=source)
            return codec.IDENTIFIER_REJECTED
        if connect.username not in (None, device_id):
            self.refusals.refuse("auth", who, f"user name {connect.username!r} is not the client id", source=source)
            self.access.audit(device_id, source, "mqtt", "device:connect", device_id, "denied",
                              "unauthorized: the user name is not the client id")
            return codec.BAD_CREDENTIALS
        try:
            token = connect.password.decode() if connect.password else None
            record = await self.ctx.authenticate(device_id, token)
        except (AuthError, UnicodeDecodeError) as error:
            self.refusals.refuse("auth", who, str(error), source=source)
            self.access.audit(device_id, source, "mqtt", "device:connect", device_id, "denied", f"unauthorized: {error}")
            return codec.BAD_CREDENTIALS
        except AnonymousDevicesFull as error:
            self.refusals.refuse("anonymous", who, str(error), source=source)
            return codec.SERVER_UNAVAILABLE
        except KonsulError as error:  # registering an anonymous device failed: not the device's fault
            log.error("could not admit %s: %s", who, error)
            return codec.SERVER_UNAVAILABLE
        if connect.will_topic is not None and (
            connect.will_topic != device_topic(device_id, "status") or connect.will_payload != b"offline"
        ):
            self.refusals.refuse(
                "will", who, f"a Last Will is 'offline' on {device_topic(device_id, 'status')}, not {connect.will_topic!r}",
                source=source,
            )
            return codec.NOT_AUTHORIZED
        self.records[device_id] = record
        return codec.ACCEPTED

    def connected(self, device_id: str, peer: str) -> None:
        self.links[device_id] = self.links.get(device_id, 0) + 1
        self.metrics.connects.inc()
        self.metrics.connected.set(len(self.links))
        self.ctx.presence.seen(device_id, "mqtt", peer)
        self._queue(Outgoing(device_topic(device_id, "status"), b"online", True, "status"))

    def disconnected(self, device_id: str) -> None:
        left = self.links.get(device_id, 0) - 1
        if left > 0:  # a newer connection of the same device took over
            self.links[device_id] = left
            return
        self.links.pop(device_id, None)
        self.metrics.connected.set(len(self.links))
        self._offline(device_id)
        self._queue(Outgoing(device_topic(device_id, "status"), b"offline", True, "status"))

    # -- authorization (embedded broker) --------------------------------------------

    def may_subscribe(self, device_id: str, topic_filter: str) -> bool:
        record = self.records.get(device_id)
        try:
            if record is None:
                raise TopicRefused("forbidden", f"device {device_id!r} is not registered")
            check_subscribe(record, topic_filter, self.access.rights(record))
        except TopicRefused as refused:
            self.refusals.refuse(refused.reason, device_id, f"SUBSCRIBE {topic_filter!r}: {refused}")
            if refused.reason == "forbidden":
                presence = self.ctx.presence.get(device_id)
                self.access.audit(device_id, _host(presence.address), "mqtt", "subscribe", topic_filter, "denied",
                                  f"permission_denied: {refused}")
            return False
        return True

    def may_receive(self, device_id: str, topic: str) -> bool:
        # Asked for every message and subscriber: the rights are a cached lookup.
        record = self.records.get(device_id)
        return record is not None and topic_may_receive(record, topic, self.access.rights(record))

    def receiver(self, device_id: str) -> Callable[[str], bool]:
        """:meth:`may_receive` for one device, its record and rights looked up once (for a batch of messages)."""
        record = self.records.get(device_id)
        if record is None:
            return _nobody
        rights = self.access.rights(record)
        return lambda topic: topic_may_receive(record, topic, rights)

    def retained_kv(self, device_id: str, topic_filter: str) -> list[tuple[str, bytes]]:
        """The KV topics matching a new subscription, from the store (the broker keeps no copy)."""
        record = self.records.get(device_id)
        if record is None or not topic_filter.startswith(KV):
            return []
        literal = literal_prefix(topic_filter[len(KV):])
        prefix = topic_filter[len(KV):] if literal is None else literal
        try:
            entries = self.scope.kv.list(prefix)
        except KonsulError:
            return []
        found = []
        rights = self.access.rights(record)
        for entry in entries:
            topic = kv_topic(entry.key)
            if topic and matches(topic_filter, topic) and rights.allows("key", entry.key, "read"):
                found.append((topic, entry.value))
        return found

    # -- inbound ---------------------------------------------------------------------

    def congested(self) -> bool:
        return self._kv_unsettled + len(self._hook_calls) + len(self._telemetry) > HIGH_WATER

    def received(self, device_id: str | None, publish: Publish, who: str, done: Done | None) -> None:
        """One PUBLISH from a device (``device_id`` None: via an external broker).

        ``done(ok)`` is called once it is handled: at once, or for a KV write
        once it is durable. A refused message is handled too (it is dropped,
        as mosquitto does), so that a client does not resend it forever.

        A device past its message rate (``--device-message-rate``) has its
        message dropped the same way: MQTT 3.1.1 has no way to refuse one
        PUBLISH (PUBACK carries no reason code before MQTT 5), and closing
        the connection would make a QoS 1 client resend the same messages
        after reconnecting, adding to the flood. The drop is counted
        (``konsul_rate_limited_total{interface="mqtt",kind="device"}`` and
        ``konsul_mqtt_refused_total{reason="rate_limited"}``), logged
        (rate-limited) and audited (one event per device and second, with
        the count of the refusals in between).
        """
        try:
            if device_id is None:
                topic = parse_topic(publish.topic)
            else:
                wait = self.rate.take(device_id)
                if wait is not None:
                    self._rate_limited(device_id, publish, who, wait)
                    if done is not None:
                        done(True, REFUSAL_CODES["rate_limited"])
                    return
                record = self.records.get(device_id)
                if record is None:
                    raise TopicRefused("forbidden", f"device {device_id!r} is not registered")
                topic = check_publish(record, publish.topic, self.access.rights(record))
            if topic.kind == "kv":
                if self._write_kv(topic.key, publish, who, done) and device_id is not None:
                    operation = "kv:write" if publish.payload else "kv:delete"
                    self.access.audit(device_id, _host(who), "mqtt", operation, topic.key)
                return
            if topic.kind == "status":
                if check_status(publish.payload):
                    self.ctx.presence.seen(topic.device_id, "mqtt")
                    if device_id is None:
                        self.seen_via_broker.add(topic.device_id)
                else:
                    self._offline(topic.device_id)
                    self.seen_via_broker.discard(topic.device_id)
                self._received_count["status"].inc()
            elif topic.kind in ("telemetry", "reported"):
                document = decode_document(publish.payload, cbor=topic.kind == "telemetry")
                self._received_count[topic.kind].inc()
                if device_id is not None:  # one event per message (a telemetry batch too), not per sample
                    operation = "telemetry:write" if topic.kind == "telemetry" else "twin:reported"
                    self.access.audit(device_id, _host(who), "mqtt", operation, topic.device_id)
                if topic.kind == "telemetry" and self.ctx.hooks.ingest_telemetry is not None:
                    self._queue_telemetry(topic.device_id, document, publish, who, done)
                    return
                hook = self.ctx.hooks.on_document(topic.kind)
                if hook is not None:
                    self._call_hook(hook, (topic.device_id, document), who, done)
                    return
            else:  # desired seen through an external broker: ours, or someone else's business
                pass
        except TopicRefused as refused:
            self.refusals.refuse(refused.reason, who, f"PUBLISH {publish.topic!r}: {refused}")
            if refused.reason == "forbidden" and device_id is not None:
                self.access.audit(device_id, _host(who), "mqtt", "publish", publish.topic, "denied",
                                  f"permission_denied: {refused}")
            if done is not None:
                done(True, REFUSAL_CODES[refused.reason])  # dropped; a v5 client reads why
            return
        except PayloadRefused as refused:
            self.refusals.refuse("payload", who, f"PUBLISH {publish.topic!r}: {refused}")
            if done is not None:
                done(True, REFUSAL_CODES["payload"])
            return
        if done is not None:
            done(True)

    def _rate_limited(self, device_id: str, publish: Publish, who: str, wait: float) -> None:
        detail = (
            f"PUBLISH {publish.topic!r}: over the device's message rate ({self.rate.rate:g}/s, "
            f"burst {self.rate.burst:g}); dropped, room again in {wait:.3f}s"
        )
        self.refusals.refuse("rate_limited", who, detail)
        self.access.audit_rate_limited(device_id, _host(who), "mqtt", publish.topic, detail)

    def _write_kv(self, key: str, publish: Publish, who: str, done: Done | None) -> bool:
        """Queue a KV write; False if it was refused."""
        try:
            check_value(publish.payload)
        except KonsulError as error:
            self.refusals.refuse("invalid", who, f"PUBLISH {publish.topic!r}: {error}")
            self._republish(key)  # put the broker's retained copy back to what the store holds
            if done is not None:
                done(True, REFUSAL_CODES["invalid"])
            return False
        if publish.qos == 0 and self._kv_unsettled >= MAX_BACKLOG:
            self.refusals.refuse("overload", who, f"PUBLISH {publish.topic!r}: {self._kv_unsettled} writes queued")
            return False
        # An empty payload deletes, retained or not: "publish nothing here".
        write = ("set", key, publish.payload, 0) if publish.payload else ("delete", key)
        try:
            self.scope.kv_submit(write, partial(self._kv_written, done))
        except StoreError as error:  # the store is not running: a QoS 1 sender resends
            log.error("a KV write from %s failed, not acknowledged: %s", who, error)
            if done is not None:
                done(False)
            return False
        except KonsulError as error:  # refused (a key the store does not take): nothing changed
            self.refusals.refuse("invalid", who, f"PUBLISH {publish.topic!r}: {error}")
            self._republish(key)
            if done is not None:
                done(True)
            return False
        self._kv_unsettled += 1
        self._received_count["kv_write" if publish.payload else "kv_delete"].inc()
        return True

    def _kv_written(self, done: Done | None, error: BaseException | None) -> None:
        """A submitted KV write is durable (``error`` None), or is not: settle it with the next ones."""
        self._kv_unsettled -= 1
        if error is not None:
            self._kv_failed = (self._kv_failed[0] + 1, error)
        if done is not None:
            # Not acknowledged on failure: a QoS 1 sender keeps the message and resends it.
            self._kv_results.append((done, error is None))
        self._kv_wake.set()

    def _call_hook(self, hook: Callable[..., Any], args: tuple, who: str, done: Done | None) -> None:
        if len(self._hook_calls) >= MAX_BACKLOG:
            self.refusals.refuse("overload", who, f"{len(self._hook_calls)} messages wait for the agent")
            if done is not None:
                done(True, REFUSAL_CODES["overload"])  # dropped, as a refused message is
            return
        self._hook_calls.append((hook, args, who, done))
        self._hook_wake.set()

    def _queue_telemetry(self, device_id: str, document: Any, publish: Publish, who: str, done: Done | None) -> None:
        if publish.qos == 0 and len(self._telemetry) >= MAX_BACKLOG:
            self.refusals.refuse("overload", who, f"PUBLISH {publish.topic!r}: {len(self._telemetry)} samples queued")
            return
        self._telemetry.append(((device_id, document), who, done))
        self._telemetry_lot.unpark()

    def broker_lost(self) -> None:
        """The external broker is gone: nobody's status can be known until it is back."""
        for device_id in self.seen_via_broker:
            self._offline(device_id)
        self.seen_via_broker.clear()

    def _offline(self, device_id: str) -> None:
        if self.ctx.presence.get(device_id).protocol == "mqtt":
            self.ctx.presence.offline(device_id)

    # -- outbound ----------------------------------------------------------------------

    def publish_desired(self, device_id: str, state: dict[str, Any] | None) -> None:
        """(Re)publish a device's full desired state, retained; None clears it."""
        check_device_id(device_id)
        payload = b"" if state is None else json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        if payload:
            self.desired[device_id] = payload
        else:
            self.desired.pop(device_id, None)
        self._queue(Outgoing(device_topic(device_id, "desired"), payload, True, "desired"))

    def publish_event(self, name: str, payload: bytes) -> None:
        """A user event to the devices subscribed to ``konsul/v1/events/<name>`` (not retained)."""
        self._queue(Outgoing(event_topic(name), payload, False, "event"))

    def install_push(self) -> None:
        """Let the agent reach devices through this gateway (``GatewayContext.push``)."""
        push = self.ctx.push
        push.publish_desired, push.publish_event = self.publish_desired, self.publish_event

    def remove_push(self) -> None:
        """Undo :meth:`install_push`, unless another gateway has replaced it since."""
        push = self.ctx.push
        if push.publish_desired == self.publish_desired:
            push.publish_desired = None
        if push.publish_event == self.publish_event:
            push.publish_event = None

    def _queue(self, message: Outgoing) -> None:
        self._outgoing.append(message)
        self._out_wake.set()

    def _republish(self, key: str) -> None:
        self._dirty_keys[key] = None
        self._out_wake.set()

    def _on_change(self, collection: str, keys: set[str]) -> None:
        if collection == "kv":
            for key in sorted(keys):
                self._dirty_keys[key] = None
            self._out_wake.set()
        elif collection == "devices":
            for key in keys:
                if not key.startswith("d/"):
                    continue  # a twin field: the agent publishes desired state itself
                device_id = key[2:]
                old = self.records.get(device_id)
                if old is not None:
                    record = self.scope.devices.get(device_id)
                    if record is None:  # deleted: its connections go too, and its retained status
                        del self.records[device_id]
                        self._kicks.append((device_id, None, "device deleted"))
                        self._queue(Outgoing(device_topic(device_id, "status"), b"", True, "status"))
                    else:
                        if record.token_hash != old.token_hash:
                            # A rotated token (or an anonymous device given one): sessions
                            # that connected with another token end; the device must
                            # reconnect with the new one. New rights (KVWrite, Policies)
                            # need no reconnection: they apply from the next message.
                            self._kicks.append((device_id, record.token_hash, "token rotated"))
                            self._out_wake.set()
                        self.records[device_id] = record

    # -- tasks ---------------------------------------------------------------------------

    async def run(self, outlet: Outlet, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.outlet = outlet
        self.scope.listeners.append(self._on_change)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._settle_kv_writes)
                nursery.start_soon(self._hook_runner)
                nursery.start_soon(self._batch_writer, self._telemetry, self._telemetry_lot, self._store_telemetry)
                nursery.start_soon(self._pump)
                task_status.started()
        finally:
            self.scope.listeners.remove(self._on_change)

    async def _batch_writer(self, queue: deque, lot: trio.lowlevel.ParkingLot, apply: Callable[[list], Any]) -> None:
        # Telemetry samples (KV writes go to Scope.kv_submit instead). Batches
        # are pipelined: up to COMMITS_IN_FLIGHT workers each take whatever is
        # queued, hand it to the telemetry buffer and wait for it to be
        # durable, so the next batch is taken while the last commits, and
        # appends that queue together share one transaction (the buffer's
        # SqliteWriter). Standing workers rather than a task per batch: at
        # QoS 1 a batch is ~10 messages, and starting a task, a nursery and
        # their cancel scopes per batch was a tenth of the CPU.
        async with trio.open_nursery() as nursery:
            for _ in range(COMMITS_IN_FLIGHT):
                nursery.start_soon(self._batch_worker, queue, lot, apply)

    async def _batch_worker(self, queue: deque, lot: trio.lowlevel.ParkingLot, apply: Callable[[list], Any]) -> None:
        while True:
            while not queue:
                await lot.park()
            async with self._commits:
                count = min(MAX_BATCH, len(queue))
                if not count:
                    continue
                batch = [queue.popleft() for _ in range(count)]
                if queue:
                    lot.unpark()  # more than one batch waits: another worker may start
                await apply(batch)

    async def _settle_kv_writes(self) -> None:
        # Results reach the outlet in the order the scope reports them, which
        # is the order the writes were submitted in.
        while True:
            await self._kv_wake.wait()
            self._kv_wake = trio.Event()
            results, self._kv_results = self._kv_results, []
            (failed, error), self._kv_failed = self._kv_failed, (0, None)
            if failed:
                log.error("%d KV writes failed, not acknowledged: %s", failed, error)
            if results or not self.congested():
                await self.outlet.settle(results)

    async def _hook_runner(self) -> None:
        # A QoS 1 message is acknowledged once its hook returned (reported
        # state is durable in the twin by then); a refused one is dropped, and
        # one the store could not take is not acknowledged, so it comes again.
        while True:
            await self._hook_wake.wait()
            self._hook_wake = trio.Event()
            while self._hook_calls:
                hook, args, who, done = self._hook_calls.popleft()
                ok = True
                try:
                    result = hook(*args)
                    if inspect.isawaitable(result):
                        await result
                except StoreError as error:
                    log.error("a message from %s was not stored, not acknowledged: %s", who, error)
                    ok = False
                except KonsulError as error:
                    self.refusals.refuse("payload", who, str(error))
                except Exception:
                    log.exception("hook %r failed on a message from %s", hook, who)
                await self.outlet.settle([] if done is None else [(done, ok)])
            await self.outlet.settle([])  # readers paused on a full queue may go on

    async def _store_telemetry(self, batch: list) -> None:
        ingest = self.ctx.hooks.ingest_telemetry
        assert ingest is not None  # batches are queued only while it is installed
        try:
            refusals = await ingest([item for item, _who, _done in batch])
            ok = True
        except KonsulError as error:
            log.error("%d telemetry samples not stored, not acknowledged: %s", len(batch), error)
            refusals, ok = [None] * len(batch), False
        for (_item, who, _done), refusal in zip(batch, refusals):
            if refusal is not None:
                self.refusals.refuse("payload", who, f"telemetry sample: {refusal}")
        results = [(done, ok) for _item, _who, done in batch if done is not None]
        if results or not self.congested():
            await self.outlet.settle(results)

    async def _pump(self) -> None:
        while True:
            await self._out_wake.wait()
            self._out_wake = trio.Event()
            messages = self._take_outgoing()
            kicks, self._kicks = self._kicks, []
            for device_id, keep, why in kicks:
                await self.outlet.kick(device_id, keep, why)
            if messages:
                await self.outlet.send(messages)
                kinds: dict[str, int] = {}
                for message in messages:  # one label lookup per kind and batch, not per message
                    kinds[message.kind] = kinds.get(message.kind, 0) + 1
                for kind, count in kinds.items():
                    self.metrics.published.labels(kind).inc(count)

    def _take_outgoing(self) -> list[Outgoing]:
        messages, self._outgoing = self._outgoing, []
        keys, self._dirty_keys = self._dirty_keys, {}
        for key in keys:
            topic = kv_topic(key)
            if topic is None:
                continue  # '+' or '#' in the key: not expressible as a topic
            entry = self.scope.kv.get(key)
            messages.append(Outgoing(topic, b"" if entry is None else entry.value, True, "kv"))
        return messages

    def kv_messages(self) -> list[Outgoing]:
        """Every KV key as a retained message (for a broker that must be brought up to date)."""
        found = []
        for entry in self.scope.kv.list(""):
            topic = kv_topic(entry.key)
            if topic is not None:
                found.append(Outgoing(topic, entry.value, True, "kv"))
        return found


def _nobody(_topic: str) -> bool:
    return False


@lru_cache(maxsize=4096)  # asked once per message for its audit event, of a few thousand connections' names
def _host(who: str) -> str:
    """The address of ``device@host:port`` (or ``host:port``), for audit events."""
    address = who.rpartition("@")[2]
    host, colon, _port = address.rpartition(":")
    return host if colon else address
