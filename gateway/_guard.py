"""Flood guards without IO: what one peer address may cost the exchange before it logs on.

A real exchange bounds what an unauthenticated peer can hold and how fast it can guess: this
``PeerGuard`` decides, per new connection, whether it is admitted (caps on connections held,
on connections not yet logged on, and on those from one peer address), and blocks a peer
address that keeps failing logons (``bad_credentials``) for a while. It counts per peer
address, never per member, so someone guessing a member's token from elsewhere cannot lock that
member out. ``LogLimiter`` keeps the log of a flood to a few lines. Time is an argument.

A peer is an IP address as a string; IPv6 addresses count per /64 network (one host usually
holds a whole /64), IPv4-mapped IPv6 addresses as the IPv4 address. "" is an unknown peer (the
sans-IO tests' connections): only the global caps apply to it.
"""

from __future__ import annotations

import ipaddress

__all__ = ["PeerGuard", "LogLimiter", "peer_key", "power_of_ten", "MAX_TRACKED"]

MAX_TRACKED = 100_000  # peers (and log keys) remembered at once; beyond, new ones are not tracked
PRUNE_EVERY = 10.0  # seconds between sweeps of records that no longer matter
LOG_WINDOW = 60.0  # seconds: a rate-limited log line's count starts again after this


def peer_key(peername) -> str:
    """The peer address a connection counts under, from ``transport.get_extra_info("peername")``."""
    if not isinstance(peername, tuple) or not peername:
        return ""
    host = str(peername[0])
    if ":" not in host:
        return host
    try:
        addr = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


def power_of_ten(n: int) -> bool:
    """1, 10, 100, ...: the occurrences of a repeated event that are logged."""
    return n > 0 and n == 10 ** (len(str(n)) - 1)


class LogLimiter:
    """Counts occurrences per key in windows of ``LOG_WINDOW`` seconds; ``hit`` returns the count
    when the line should be logged (the 1st, 10th, 100th... of the window), else 0."""

    __slots__ = ("window", "counts")

    def __init__(self, window: float = LOG_WINDOW) -> None:
        self.window = window
        self.counts: dict[object, list] = {}  # key -> [window start, count]

    def hit(self, key, now: float) -> int:
        entry = self.counts.get(key)
        if entry is None or now - entry[0] >= self.window:
            if entry is None and len(self.counts) >= MAX_TRACKED:
                self.prune(now)
                if len(self.counts) >= MAX_TRACKED:
                    return 0  # flooded with keys: say nothing more until the sweep
            entry = self.counts[key] = [now, 0]
        entry[1] += 1
        n = entry[1]
        return n if power_of_ten(n) else 0

    def prune(self, now: float) -> None:
        window = self.window
        for key in [k for k, (start, _) in self.counts.items() if now - start >= window]:
            del self.counts[key]


class _Peer:
    __slots__ = ("pending", "failures", "since", "blocked_until")

    def __init__(self) -> None:
        self.pending = 0          # its connections not yet logged on (held now)
        self.failures = 0         # bad_credentials since ``since``
        self.since = 0.0
        self.blocked_until = 0.0  # its new connections are refused until then


class PeerGuard:
    """Admission of new connections and blocking of peers that keep failing logons."""

    def __init__(self, gw) -> None:
        self.max_connections = gw.max_connections
        self.max_pending = gw.max_pending_logons
        self.max_pending_per_peer = gw.max_pending_per_peer        # 0: no cap per peer
        self.failures_allowed = gw.logon_failures_per_peer         # 0: never block
        self.block_s = gw.logon_block_s
        self.pending = 0  # connections not yet logged on, all peers
        self.peers: dict[str, _Peer] = {}

    def set_limits(self, max_connections: int, max_pending: int) -> None:
        """Lower caps than configured (the server's open-file limit is too low for them)."""
        self.max_connections = max_connections
        self.max_pending = max_pending

    def admit(self, peer: str, connections: int, now: float) -> str:
        """Why a new connection from ``peer`` is refused ("" if it is admitted and now counts as
        pending). ``connections``: how many the server holds already."""
        record = self.peers.get(peer) if peer else None
        if record is not None and now < record.blocked_until:
            return "peer_blocked"
        if connections >= self.max_connections:
            return "too_many_connections"
        if self.pending >= self.max_pending:
            return "too_many_pending_logons"
        if peer:
            if record is None:
                if len(self.peers) >= MAX_TRACKED:
                    self.prune(now)
                record = self.peers[peer] = _Peer()  # pending ones are few (max_pending): always tracked
            if self.max_pending_per_peer and record.pending >= self.max_pending_per_peer:
                return "peer_pending_limit"
            record.pending += 1
        self.pending += 1
        return ""

    def logged_on_or_gone(self, peer: str) -> None:
        """An admitted connection is no longer pending (its logon was accepted, or it ended)."""
        self.pending -= 1
        record = self.peers.get(peer) if peer else None
        if record is not None and record.pending > 0:
            record.pending -= 1

    def logon_failed(self, peer: str, now: float) -> bool:
        """A ``bad_credentials`` from ``peer``; True if that blocks the peer from now on."""
        if not peer or not self.failures_allowed:
            return False
        record = self.peers.get(peer)
        if record is None:
            if len(self.peers) >= MAX_TRACKED:
                self.prune(now)
                if len(self.peers) >= MAX_TRACKED:
                    return False
            record = self.peers[peer] = _Peer()
        if now - record.since >= self.block_s:
            record.since, record.failures = now, 0
        record.failures += 1
        if record.failures >= self.failures_allowed and self.block_s > 0:
            record.blocked_until = now + self.block_s
            record.since, record.failures = now, 0
            return True
        return False

    def blocked(self, peer: str, now: float) -> bool:
        record = self.peers.get(peer) if peer else None
        return record is not None and now < record.blocked_until

    def prune(self, now: float) -> None:
        """Forget peers with nothing pending, no block and no recent failure."""
        block_s = self.block_s
        stale = [p for p, r in self.peers.items()
                 if r.pending == 0 and now >= r.blocked_until and now - r.since >= block_s]
        for p in stale:
            del self.peers[p]
