"""Token-bucket rate limits per token, per client address and per device.

Theory of operation: each limited thing (an ACL token's accessor, a client
address, a device) has a bucket of ``burst`` tokens that refills at ``rate``
tokens per second; a request (or message) takes ``cost`` tokens, and is
refused while the bucket holds fewer. A refusal says how many seconds until
the bucket holds enough again: HTTP sends it as ``Retry-After``.

Buckets live in one bounded table per limit (least recently used first out):
an attacker cycling through addresses or made-up tokens cannot grow it past
``max_keys``. Forgetting a bucket only ever gives that key a full bucket
again, so the bound costs precision for the keys evicted, never a false
refusal.

The clock is injectable (``clock=``) so tests step time instead of sleeping.
A rate of 0 turns a limit off (``take`` always allows).

How an interface uses it::

    limits = HttpRateLimits.from_limits(ctx.limits, registry, "http")
    wait = limits.check(principal.accessor_id, source_of(addr))
    if wait is not None:
        raise RateLimited(wait)   # 429, Retry-After: retry_after(wait)
"""

from __future__ import annotations

import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from konsul.sync.errors import KonsulError

DEFAULT_MAX_KEYS = 16_384  # buckets remembered per limit (~150 bytes each)

Clock = Callable[[], float]

# One counter family per Prometheus registry, shared by every limiter that
# reports to it (a registry refuses a second collector of the same name).
_counters: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def rate_limited_counter(registry: Any):
    """``konsul_rate_limited_total{interface,kind}`` on ``registry`` (made once per registry)."""
    counter = _counters.get(registry)
    if counter is None:
        from prometheus_client import Counter

        counter = Counter(
            "konsul_rate_limited",
            "Requests or messages refused by a rate limit, by interface and limit kind",
            ["interface", "kind"],
            registry=registry,
        )
        _counters[registry] = counter
    return counter


class RateLimited(KonsulError):
    """A request past its rate limit; HTTP answers 429 with ``Retry-After``."""

    code = "rate_limited"
    status = 429

    def __init__(self, wait_s: float, kind: str = "") -> None:
        self.wait_s = wait_s
        self.kind = kind
        what = {"token": "this token", "source": "this address", "device": "this device"}.get(kind, "this client")
        super().__init__(
            f"too many requests from {what}; retry after {retry_after(wait_s)} s "
            "(the agent's rate limits are in docs/acl.md)"
        )

    @property
    def headers(self) -> dict[str, str]:
        """What an HTTP answer adds: ``Retry-After`` in whole seconds."""
        return {"Retry-After": str(retry_after(self.wait_s))}


def retry_after(wait_s: float) -> int:
    """Whole seconds for a ``Retry-After`` header: rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


class TokenBuckets:
    """Buckets of one limit (one interface and kind), keyed by whatever is limited.

    Args:
        rate: tokens added per second; 0 turns the limit off.
        burst: the most tokens a bucket holds (what a key may spend at once).
        interface: the ``interface`` label of refusals (``http``, ``mqtt``, ``coap``).
        kind: the ``kind`` label (``token``, ``source``, ``device``).
        registry: a Prometheus registry to count refusals on, or None.
        max_keys: buckets kept at most; the least recently used is forgotten first.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        interface: str = "",
        kind: str = "",
        registry: Any = None,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Clock = time.monotonic,
    ) -> None:
        if rate < 0 or burst < 0 or max_keys < 1:
            raise ValueError("rate and burst must not be negative, and at least one key must fit")
        self.rate = float(rate)
        self.burst = float(max(burst, 1)) if rate else 0.0
        self.interface = interface
        self.kind = kind
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[object, list[float]] = OrderedDict()  # key -> [tokens, at]
        self.refused = 0
        self._counter = None if registry is None else rate_limited_counter(registry).labels(interface, kind)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: object, cost: float = 1.0) -> float | None:
        """Spend ``cost`` tokens of ``key``'s bucket.

        Returns None when allowed, else the seconds until the bucket holds
        enough (nothing is spent on a refusal). A cost above the burst is
        charged as the burst, so that no request is refused forever.
        """
        if not self.rate:
            return None
        cost = min(cost, self.burst)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = [self.burst, now]
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            # max(): a clock that steps back must not drain the bucket.
            bucket[0] = min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= cost - 1e-9:  # float refill: waiting exactly the answer must be enough
            bucket[0] = max(0.0, bucket[0] - cost)
            return None
        self.refused += 1
        if self._counter is not None:
            self._counter.inc()
        return (cost - bucket[0]) / self.rate


class HttpRateLimits:
    """The two HTTP limits: per token (its accessor) and per client address.

    Every request is charged to its address; a request with a token is also
    charged to the token, so one token shared by many addresses is bounded,
    and so is one address trying many tokens (or none).
    """

    def __init__(self, per_token: TokenBuckets, per_source: TokenBuckets) -> None:
        self.per_token = per_token
        self.per_source = per_source

    @classmethod
    def from_limits(cls, limits: Any, registry: Any = None, interface: str = "http", clock: Clock = time.monotonic) -> HttpRateLimits:
        """From ``NetworkLimits`` (its ``http_rate_*`` / ``http_burst_*`` fields)."""
        return cls(
            TokenBuckets(limits.http_rate_per_token, limits.http_burst_per_token,
                         interface=interface, kind="token", registry=registry, clock=clock),
            TokenBuckets(limits.http_rate_per_source, limits.http_burst_per_source,
                         interface=interface, kind="source", registry=registry, clock=clock),
        )

    def check(self, accessor: str | None, source: str, cost: float = 1.0) -> RateLimited | None:
        """None if the request may go on, else the :class:`RateLimited` to raise.

        The address is charged first: a refused address spends nothing of the
        token's bucket (so another address using the same token is not
        punished for it).
        """
        return self.check_source(source, cost) or (self.check_token(accessor, cost) if accessor else None)

    def check_source(self, source: str, cost: float = 1.0) -> RateLimited | None:
        """The address's share of :meth:`check`, for callers that charge it before they know the token."""
        wait = self.per_source.take(source, cost)
        return None if wait is None else RateLimited(wait, "source")

    def check_token(self, accessor: str, cost: float = 1.0) -> RateLimited | None:
        wait = self.per_token.take(accessor, cost)
        return None if wait is None else RateLimited(wait, "token")


def device_message_limit(limits: Any, interface: str, registry: Any = None, clock: Clock = time.monotonic) -> TokenBuckets:
    """Messages per device on ``interface`` (``mqtt`` or ``coap``), from ``NetworkLimits``."""
    return TokenBuckets(limits.device_message_rate, limits.device_message_burst,
                        interface=interface, kind="device", registry=registry, clock=clock)
