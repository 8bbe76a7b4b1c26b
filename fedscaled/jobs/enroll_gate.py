"""Limits on enrollment: token buckets per job token and per client address, and ``max_devices``.

Without them one leaked enrollment token made thousands of devices a second, each a store record and a
candidate in the selection pool. Buckets live in memory only (a restart forgives everyone, which is safe:
they bound rates, not totals) and their maps are bounded. A refused enrollment changes nothing in the store.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from fedscaled.core.config import JOB_KEYS, JobConfig
from fedscaled.core.ratelimit import BucketMap, TokenBucket, retry_after_seconds
from fedscaled.errors import RateLimited

log = logging.getLogger("fedscaled.enroll")

# Client addresses remembered per job; beyond it idle (refilled) buckets, then the oldest, are dropped.
MAX_ADDRESSES_PER_JOB = 10_000
# The daemon log says a job is being rate-limited at most once per this many seconds.
WARN_INTERVAL = 60.0


@dataclass(frozen=True)
class EnrollLimits:
    """A job's enrollment limits (its job keys)."""

    rate_per_token: float
    burst_per_token: int
    rate_per_address: float
    burst_per_address: int
    max_devices: int

    @classmethod
    def of(cls, config: JobConfig) -> EnrollLimits:
        """The limits of a job; a job stored before these keys existed gets their defaults."""
        def value(name: str) -> float:
            return float(config.values.get(name, JOB_KEYS[name].default))

        return cls(value("enroll_rate_per_token"), int(value("enroll_burst_per_token")),
                   value("enroll_rate_per_address"), int(value("enroll_burst_per_address")),
                   int(value("max_devices")))


def address_key(address: str | None) -> str:
    """The key an address is limited under: an IPv4 address, or the /64 network of an IPv6 one (a single
    host usually holds a whole /64, so limiting single IPv6 addresses would limit nothing)."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class EnrollGate:
    """Token buckets of every job (in memory, bounded) and the count of enrollments being committed."""

    def __init__(self) -> None:
        self._token: dict[str, TokenBucket] = {}
        self._address: dict[str, BucketMap[str]] = {}
        self.pending: dict[str, int] = {}  # enrollments of each job between their checks and their commit
        self._warned: dict[str, float] = {}

    def _token_bucket(self, job: str, limits: EnrollLimits, now: float) -> TokenBucket:
        bucket = self._token.get(job)
        if bucket is None:
            bucket = self._token[job] = TokenBucket.full(limits.rate_per_token, limits.burst_per_token, now)
        return bucket

    def _address_map(self, job: str, limits: EnrollLimits) -> BucketMap[str]:
        found = self._address.get(job)
        if found is None:
            found = self._address[job] = BucketMap(limits.rate_per_address, limits.burst_per_address,
                                                  MAX_ADDRESSES_PER_JOB)
        found.configure(limits.rate_per_address, limits.burst_per_address)  # a replaced job may change them
        return found

    def _refuse(self, job: str, which: str, wait: float, now: float, address: str) -> RateLimited:
        if now - self._warned.get(job, -WARN_INTERVAL) >= WARN_INTERVAL:
            self._warned[job] = now
            log.warning("job %s: enrollments are being rate-limited (%s%s); a leaked enrollment token can be "
                        "replaced with `fedscalectl rotate-token %s`", job, which,
                        f" {address}" if which == "per_address" else "", job)
        seconds = retry_after_seconds(wait)
        return RateLimited(f"too many enrollments for job {job} ({which.replace('_', ' ')}); retry after "
                           f"{seconds} s", retry_after=seconds, limit=which, job=job)

    def check_address(self, job: str, limits: EnrollLimits, address: str, now: float) -> None:
        """RateLimited if ``address`` may not try to enroll now."""
        wait = self._address_map(job, limits).wait(address_key(address), now)
        if wait > 0:
            raise self._refuse(job, "per_address", wait, now, address_key(address))

    def check_token(self, job: str, limits: EnrollLimits, now: float) -> None:
        """RateLimited if the job's token may not enroll a device now."""
        wait = self._token_bucket(job, limits, now).wait(now)
        if wait > 0:
            raise self._refuse(job, "per_token", wait, now, "")

    def spend_address(self, job: str, limits: EnrollLimits, address: str, now: float) -> None:
        """Count an enrollment attempt of ``address`` (refused ones too: guessing tokens costs)."""
        self._address_map(job, limits).take(address_key(address), now)

    def spend_token(self, job: str, limits: EnrollLimits, now: float) -> None:
        """Count an enrollment with the job's token."""
        self._token_bucket(job, limits, now).take(now)

    def forget(self, job: str) -> None:
        """Drop a job's buckets (it was replaced or ended)."""
        self._token.pop(job, None)
        self._address.pop(job, None)
        self._warned.pop(job, None)
