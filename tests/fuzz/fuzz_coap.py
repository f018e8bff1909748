"""CoAP datagrams against a running edge, and the check that it still serves.

The CoAP gateway parses inside aiocoap, behind the trio-asyncio bridge, in the
agent process: a datagram that breaks it may end the process, or leave it
running but deaf. So the gateway is fuzzed from outside: datagrams go to a
real ``konsul edge --allow-anonymous`` over UDP on loopback, and after each
batch the edge must still answer a CoAP GET and an HTTP GET, and still hold
a value acknowledged before the batch.

Used by ``test_fuzz_coap.py`` (short, deterministic) and ``bench/fuzz.py``
(long, restarting the edge after each crash to find the next one).
"""

from __future__ import annotations

import itertools
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import cbor2
from aiocoap import Message
from aiocoap.error import Error as CoapDecodeError
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import CON, NON
from aiocoap.optiontypes import BlockOption

from agents import EdgeProcess

SENTINEL_KEY = "fuzz/sentinel"
SENTINEL_VALUE = b"acknowledged before the fuzzing"
ANSWER_TIMEOUT = 2.0  # loopback: an answer is immediate, unless the agent is gone


def datagram(
    code: Code,
    path: tuple[str, ...],
    query: tuple[str, ...] = (),
    payload: bytes = b"",
    *,
    mid: int = 1,
    token: bytes = b"\x01",
    confirmable: bool = True,
    content_format: int | None = None,
    accept: int | None = None,
    observe: int | None = None,
    block1: tuple[int, bool, int] | None = None,
    block2: tuple[int, bool, int] | None = None,
) -> bytes:
    """One CoAP message, encoded by aiocoap (so every option is framed as the RFC says)."""
    message = Message(code=code, uri_path=path, uri_query=query, payload=payload)
    message.mid, message.token, message.mtype = mid, token, CON if confirmable else NON
    if content_format is not None:
        message.opt.content_format = content_format
    if accept is not None:
        message.opt.accept = accept
    if observe is not None:
        message.opt.observe = observe
    if block1 is not None:
        message.opt.block1 = BlockOption.BlockwiseTuple(*block1)
    if block2 is not None:
        message.opt.block2 = BlockOption.BlockwiseTuple(*block2)
    return message.encode()


def seed_datagrams() -> list[bytes]:
    """Valid requests on every resource, the starting points for mutation."""
    links = b'</sensors/temp>;rt="temperature-c";if="sensor",</light>;obs'
    return [
        datagram(Code.GET, ("kv", "fuzz", "a"), ("ep=dev-1",), mid=1),
        datagram(Code.PUT, ("kv", "fuzz", "a"), ("ep=dev-1",), cbor2.dumps(b"value"), mid=2, content_format=60),
        datagram(Code.PUT, ("kv", "fuzz", "j"), (), b'{"a":[1,2]}', mid=3, content_format=50),
        datagram(Code.DELETE, ("kv", "fuzz", "a"), ("ep=dev-1",), mid=4),
        datagram(Code.GET, ("kv", "fuzz", "o"), ("ep=dev-1",), mid=5, observe=0, block2=(0, False, 2)),
        datagram(Code.PUT, ("kv", "fuzz", "b"), (), b"x" * 64, mid=6, content_format=42, block1=(0, True, 2)),
        datagram(Code.POST, ("rd",), ("ep=dev-2", "lt=60", "base=coap://127.0.0.1:5683"), links, mid=7, content_format=40),
        datagram(Code.GET, ("rd-lookup", "res"), ("rt=temp*",), mid=8),
        datagram(Code.GET, ("rd-lookup", "ep"), ("ep=dev-2",), mid=9),
        datagram(Code.POST, ("devices", "dev-3", "telemetry"), ("ep=dev-3",), cbor2.dumps({"t": 21.5}), mid=10, content_format=60),
        datagram(Code.PUT, ("devices", "dev-3", "reported"), ("ep=dev-3",), b'{"mode":"eco"}', mid=11, content_format=50),
        datagram(Code.GET, ("devices", "dev-3", "desired"), ("ep=dev-3",), mid=12, observe=0),
        datagram(Code.GET, (".well-known", "core"), (), mid=13, confirmable=False),
    ]


class CoapEdge:
    """A ``konsul edge`` serving CoAP to anonymous devices, and a UDP socket to it."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="konsul-fuzz-"))
        self._mids = itertools.count(0x4000)
        self.starts = 0
        self.answers: list[Message] = []  # what the edge sent back, besides the probes' answers
        self._start()

    def _start(self) -> None:
        self.process = EdgeProcess(
            self.data_dir / f"run{self.starts}", extra=["--acl", "off", "--coap-addr", "127.0.0.1:0", "--allow-anonymous"]
        )
        self.starts += 1
        self.coap = self.process.coap_addr()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(self.coap)
        self._http("PUT", f"/v1/kv/{SENTINEL_KEY}", SENTINEL_VALUE)

    def send(self, datagrams: list[bytes]) -> None:
        for data in datagrams:
            try:
                self.sock.send(data)
            except OSError:  # ICMP "port unreachable" from an earlier datagram: the edge is gone
                return

    def exchange(self, data: bytes) -> Message | None:
        """Send one request and wait for its answer (None if none comes: the request was not one).

        The message id is replaced by a fresh one: the edge answers a repeated
        id from its duplicate cache, without looking at the request again.
        """
        if len(data) >= 4:
            data = data[:2] + (next(self._mids) & 0xFFFF).to_bytes(2, "big") + data[4:]
        try:
            request = Message.decode(data)
        except Exception:  # noqa: BLE001 - not a message this side can read; send it anyway
            request = None
        self.send([data])
        if request is None or not request.code.is_request():
            return None
        self.sock.settimeout(ANSWER_TIMEOUT)
        try:
            while True:
                answer = Message.decode(self.sock.recv(65536))
                self.answers.append(answer)
                if answer.mid == request.mid or (answer.token == request.token and answer.code.is_response()):
                    if answer.code.is_response() or answer.mtype.name == "RST":
                        return answer
        except (OSError, ValueError, CoapDecodeError):
            return None

    # -- is it still serving? ----------------------------------------------------------

    def problem(self) -> str | None:
        """None while the edge answers CoAP and HTTP and keeps the sentinel; else what is wrong."""
        if self.process.proc.poll() is not None:
            return f"the edge exited ({self.process.proc.returncode})"
        if not self._answers_coap():
            return "the edge does not answer a CoAP GET"
        try:
            status, _ = self._http("GET", "/v1/status/leader")
            _, body = self._http("GET", f"/v1/kv/{SENTINEL_KEY}?raw")
        except OSError as error:
            return f"the edge does not answer HTTP: {error}"
        if status != 200 or body != SENTINEL_VALUE:
            return f"the edge lost an acknowledged value (leader {status}, sentinel {body[:40]!r})"
        return None

    def _answers_coap(self) -> bool:
        for _attempt in range(3):
            mid = next(self._mids) & 0xFFFF
            token = mid.to_bytes(2, "big")
            try:
                self.sock.send(datagram(Code.GET, ("kv", SENTINEL_KEY), (), mid=mid, token=token, accept=42))
                self.sock.settimeout(ANSWER_TIMEOUT)
                while True:
                    answer = Message.decode(self.sock.recv(65536))
                    if answer.token == token and answer.code.is_response():
                        return True
                    self.answers.append(answer)
            except (OSError, ValueError, CoapDecodeError):
                if self.process.proc.poll() is not None:
                    return False
        return False

    def _http(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.process.url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    # -- after a crash -----------------------------------------------------------------

    def last_error(self, lines: int = 6) -> str:
        """The end of the edge's output: the traceback's last lines, if it has one."""
        output = [line.rstrip() for line in self.process.lines if not line.strip().startswith("^")]
        return "\n".join(output[-lines:])

    def restart(self) -> None:
        self.stop()
        self._start()

    def stop(self) -> None:
        self.sock.close()
        self.process.stop()

