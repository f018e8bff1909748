"""Device KV writes go through the scope's one put group: acknowledged once durable, in order.

Several paho-mqtt devices publish QoS 1 KV writes at full speed while HTTP puts
arrive too; after every PUBACK the edge is killed with SIGKILL. The restarted
edge holds every acknowledged write, and for each key the last one its device
sent (writes of one device are applied and acknowledged in the order sent).
"""

from __future__ import annotations

import signal

import httpx
from agents import EdgeProcess
from test_mqtt_embedded import Device, register

DEVICES = 4
WRITES = 120  # per device, over KEYS keys
KEYS = 10


def test_acknowledged_mqtt_and_http_writes_survive_kill_9_with_the_last_value_per_key(tmp_path):
    data = tmp_path / "data"
    edge = EdgeProcess(data, extra=["--mqtt-addr", "127.0.0.1:0"])
    try:
        _host, port = edge.mqtt_addr()
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            devices = []
            for d in range(DEVICES):
                token = register(http, f"dur-{d}", KVWrite=[f"dur/{d}/"])
                device = Device(port, f"dur-{d}", token)
                assert device.connected() == 0
                devices.append(device)
            sent = []
            for i in range(WRITES):
                for d, device in enumerate(devices):
                    sent.append(device.client.publish(f"konsul/v1/kv/dur/{d}/k{i % KEYS}", str(i).encode(), qos=1))
                if i % 10 == 0:
                    assert http.put(f"/v1/kv/dur/http/{i}", content=b"h%d" % i).json() is True
            for info in sent:
                info.wait_for_publish(20)  # PUBACK: durable
            for device in devices:
                device.close()
    finally:
        edge.stop(signal.SIGKILL)
    again = EdgeProcess(data)
    try:
        with httpx.Client(base_url=again.url, timeout=10) as http:
            last = {k: max(i for i in range(WRITES) if i % KEYS == k) for k in range(KEYS)}
            for d in range(DEVICES):
                got = [http.get(f"/v1/kv/dur/{d}/k{k}?raw").text for k in range(KEYS)]
                assert got == [str(last[k]) for k in range(KEYS)], d
            assert all(http.get(f"/v1/kv/dur/http/{i}?raw").text == f"h{i}" for i in range(0, WRITES, 10))
    finally:
        again.stop()
