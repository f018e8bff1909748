"""Konsul Edge example device for MicroPython (ESP32, Raspberry Pi Pico W).

Theory of operation. The device joins Wi-Fi, sets its clock if it can, then
keeps one MQTT session with its Konsul Edge agent, through the vendored
``umqtt.simple``:

* CONNECT as client id = user name = its device id, password = its token, with
  a Last Will of ``offline`` (retained, QoS 1) on its status topic: the agent
  refuses any other Will.
* ``online`` (retained) on the status topic, then SUBSCRIBE to its desired
  topic, where the agent keeps the full desired state retained, then its
  reported state.
* Every ``interval`` seconds one telemetry sample (JSON, QoS 1). The agent
  acknowledges a QoS 1 sample only once it is durable, so a sample stays
  pending until its PUBACK and is sent again, unchanged, after a reconnect; its
  ``seq`` lets the agent and the hub drop the duplicate.
* A desired state that arrives is applied (``interval``, ``led``) and the
  resulting state is reported back.
* A lost connection is retried with exponential backoff and jitter.

``seq`` must stay unique across reboots, without a clock: it is
``boot_epoch << 20 | n``, where ``boot_epoch`` is a counter in a small file,
incremented (and written) at every start before the first sample, and ``n``
counts the samples of this boot. After 2**20 samples in one boot the epoch
moves on again. Wiping the file restarts the epochs at 1: the agent would then
drop new samples as duplicates of old ones, so keep it, or change DEVICE_ID.

The same file runs under CPython in the project's tests, with the modules in
``shims/`` standing in for ``machine``, ``network`` and friends. Call
``main(max_samples=N)`` to stop after N acknowledged samples; on a device
``main()`` runs for ever.
"""

import json
import os
import random

import machine
import network
import utime
from umqtt.simple import MQTTClient, MQTTException

import config

FIRMWARE = "1.0.0"
SEQ_BITS = 20
MIN_INTERVAL = 0.1  # seconds; a desired interval below this is ignored
POLL_MS = 50  # how often the loop looks for messages from the agent
EPOCH_2000 = 946684800  # unix time of 2000-01-01, older ports' time.time() epoch
CLOCK_SET_AFTER = 1700000000  # a clock before late 2023 was never set


def setting(name, default):
    return getattr(config, name, default)


def log(*parts):
    print("[konsul-device]", *parts)


class SeqCounter:
    """Telemetry sequence numbers that stay unique across reboots."""

    def __init__(self, path):
        self.path = path
        self.epoch = self._advance()
        self.count = 0

    def _advance(self):
        try:
            with open(self.path) as f:
                epoch = int(f.read().strip()) + 1
        except (OSError, ValueError):
            epoch = 1
        # Written before the first sample of the epoch goes out, and replaced
        # whole, so that a power cut never lets an epoch be used twice.
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(epoch))
        os.rename(tmp, self.path)
        return epoch

    def next(self):
        if self.count >= 1 << SEQ_BITS:
            self.epoch = self._advance()
            self.count = 0
        seq = self.epoch << SEQ_BITS | self.count
        self.count += 1
        return seq


class Thermometer:
    """A temperature from the ADC: the RP2040's own sensor, or a TMP36 on a pin."""

    def __init__(self):
        pin = setting("SENSOR_PIN", None)
        self.adc = machine.ADC(machine.Pin(pin) if pin is not None else setting("SENSOR_ADC", 4))
        self.kind = setting("SENSOR", "rp2040")

    def read(self):
        raw = self.adc.read_u16()
        volts = raw * 3.3 / 65535
        if self.kind == "tmp36":
            celsius = (volts - 0.5) * 100
        else:  # RP2040 datasheet, 4.9.5
            celsius = 27 - (volts - 0.706) / 0.001721
        return {"temp_c": round(celsius, 2), "raw": raw}


class Backoff:
    """Exponential backoff with equal jitter, in milliseconds."""

    def __init__(self, first_s, cap_s):
        self.first = first_s
        self.cap = cap_s
        self.attempt = 0

    def reset(self):
        self.attempt = 0

    def next_ms(self):
        delay = min(self.cap, self.first * (1 << min(self.attempt, 16)))
        self.attempt += 1
        # Half fixed, half random: devices that lost the agent together (it
        # restarted) do not all come back in the same instant.
        half = delay / 2
        return int((half + half * random.getrandbits(16) / 65536) * 1000)


def unix_time():
    """Unix seconds, or None while the clock has not been set."""
    now = utime.time()
    if utime.gmtime(0)[0] == 2000:
        now += EPOCH_2000
    return now if now >= CLOCK_SET_AFTER else None


def set_clock():
    if not setting("NTP", True) or unix_time() is not None:
        return
    try:
        import ntptime

        ntptime.settime()
    except Exception as error:  # no network time: samples go without "ts"
        log("clock not set:", error)


def wifi_up():
    ssid = setting("WIFI_SSID", "")
    if not ssid:  # wired, or the board's network is set up elsewhere
        return
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if wlan.isconnected():
        return
    wlan.connect(ssid, setting("WIFI_PASSWORD", ""))
    deadline = utime.ticks_add(utime.ticks_ms(), 20000)
    while not wlan.isconnected():
        if utime.ticks_diff(deadline, utime.ticks_ms()) <= 0:
            raise OSError("Wi-Fi: no connection to %s" % ssid)
        utime.sleep_ms(100)
    log("Wi-Fi up:", wlan.ifconfig()[0])


class Device:
    """The device's state: what it applies from desired, what it reports."""

    def __init__(self):
        self.id = config.DEVICE_ID
        self.interval = setting("INTERVAL", 10)
        self.led_pin = machine.Pin(setting("LED_PIN", "LED"), machine.Pin.OUT)
        self.led = False
        self.led_pin.value(0)
        self.desired = None  # the latest desired payload, not applied yet
        self.pending = None  # the sample sent but not acknowledged yet
        self.sent = 0  # samples acknowledged, over all sessions

    def topic(self, leaf):
        return ("konsul/v1/devices/%s/%s" % (self.id, leaf)).encode()

    def on_message(self, topic, msg):
        # umqtt calls this from inside wait_msg(), possibly while a QoS 1
        # publish waits for its PUBACK: publishing from here would recurse, so
        # only note the message; the loop applies it.
        if topic == self.topic("desired"):
            self.desired = msg

    def apply_desired(self):
        """Apply the noted desired state; True if it was a valid document."""
        msg, self.desired = self.desired, None
        try:
            doc = json.loads(msg)
        except ValueError:  # an empty payload clears desired: nothing to apply
            return False
        if not isinstance(doc, dict):
            log("desired state is not a JSON object, ignored")
            return False
        interval = doc.get("interval")
        if type(interval) in (int, float) and interval >= MIN_INTERVAL:
            self.interval = interval
        led = doc.get("led")
        if type(led) is bool:
            self.led = led
            self.led_pin.value(1 if led else 0)
        log("desired applied: interval", self.interval, "led", self.led)
        return True

    def reported(self):
        return json.dumps({"interval": self.interval, "led": self.led, "firmware": FIRMWARE}).encode()


def open_session(device):
    token = setting("TOKEN", "")
    client = MQTTClient(
        device.id,
        config.AGENT_HOST,
        port=setting("AGENT_PORT", 1883),
        user=device.id if token else None,  # no token: anonymous (agent runs --allow-anonymous)
        password=token if token else None,
        keepalive=setting("KEEPALIVE", 60),
    )
    client.set_callback(device.on_message)
    client.set_last_will(device.topic("status"), b"offline", retain=True, qos=1)
    client.connect()
    client.publish(device.topic("status"), b"online", retain=True, qos=1)
    client.subscribe(device.topic("desired"), qos=1)
    return client


def run_session(client, device, seqs, thermometer, max_samples):
    """Sample, send and follow desired until max_samples are acknowledged."""
    client.publish(device.topic("reported"), device.reported(), qos=1)
    keepalive_ms = setting("KEEPALIVE", 60) * 1000
    last_sample = None
    last_sent = utime.ticks_ms()
    while max_samples is None or device.sent < max_samples:
        client.check_msg()
        if device.desired is not None and device.apply_desired():
            client.publish(device.topic("reported"), device.reported(), qos=1)
            last_sent = utime.ticks_ms()
        now = utime.ticks_ms()
        due = last_sample is None or utime.ticks_diff(now, last_sample) >= int(device.interval * 1000)
        if device.pending is None and due:
            sample = thermometer.read()
            sample["seq"] = seqs.next()
            ts = unix_time()
            if ts is not None:
                sample["ts"] = ts
            device.pending = json.dumps(sample).encode()
            last_sample = now
        if device.pending is not None:
            client.publish(device.topic("telemetry"), device.pending, qos=1)
            device.pending = None
            device.sent += 1
            last_sent = now
        elif utime.ticks_diff(now, last_sent) >= keepalive_ms // 2:
            client.ping()
            last_sent = now
        utime.sleep_ms(POLL_MS)


def close(client):
    try:
        client.sock.close()
    except Exception:
        pass


def main(max_samples=None):
    """Run the device; with max_samples, return after that many acknowledged samples."""
    device = Device()
    seqs = SeqCounter(setting("STATE_FILE", "konsul_seq"))
    thermometer = Thermometer()
    backoff = Backoff(setting("RECONNECT_MIN", 1), setting("RECONNECT_MAX", 60))
    while True:
        client = None
        try:
            wifi_up()
            set_clock()
            client = open_session(device)
            log("connected to", config.AGENT_HOST, "as", device.id)
            backoff.reset()
            run_session(client, device, seqs, thermometer, max_samples)
            # A clean DISCONNECT suppresses the Will: say offline ourselves.
            client.publish(device.topic("status"), b"offline", retain=True, qos=1)
            client.disconnect()
            log("done after", device.sent, "samples")
            return device.sent
        # umqtt reports a broken or refused connection as OSError,
        # MQTTException (CONNACK code), IndexError (EOF inside a packet) or
        # AssertionError (an unexpected packet): all mean "start again".
        except (OSError, MQTTException, IndexError, AssertionError) as error:
            if client is not None:
                close(client)
            pause = backoff.next_ms()
            log("connection lost (%r), retrying in %d ms" % (error, pause))
            utime.sleep_ms(pause)


if __name__ == "__main__":
    main()
