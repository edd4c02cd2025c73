"""Gateway benchmark: orders/s and open-loop order-to-report latency over loopback, fsync on.

Method
- The server is a real ``python -m gateway serve`` process with its own generated configuration:
  3,700 members (one session each, every covered emitter), funded, market open, throttle out of
  the way (1,000,000 msgs/s), ``durability = "fsync"``. It is pinned to one core when the machine
  allows (the one taking the block device's interrupts, if /proc/interrupts tells; a busy process
  on either the server's core or that core makes syncs slow); the load generators (separate
  processes, uvloop, raw frames, ``gc.freeze()``) share the other cores. Each latency line prints
  how long the server's threads were runnable but not running (a neighbour on its core).
- All sessions log on first and stay logged on, heartbeating (heartbeat_s = 5; the clients send
  Heartbeat when idle for half of it), while N of them (1, 10, 100, 1,000) trade.
- Maximum orders/s: every active session keeps a window of max(8, 800 / N) unacknowledged
  orders (pipelined);
  an order counts when its first report (OrderAccepted / OrderRejected) arrives. Orders buy and
  sell CEA25 at one price, so about half of them trade (a Fill on each side).
- Latency: open loop at fixed offered rates; each order has a scheduled send time and its
  latency is first report time minus scheduled time, so a slow server cannot hide its queueing.
- Baseline, same run: a minimal uvloop server with the same framing that echoes every frame,
  driven by the same generators: messages/s at the same N.
- Journal fsync p99 comes from the server's own ``kaboni_journal_fsync_seconds`` histogram over
  the latency phase (one observation per group commit); so does the server-side latency
  (``kaboni_order_to_report_latency_seconds``: bytes received to first report written), which
  leaves out the load generators' own delays. Both use the same bucket bounds; the target
  (server p99 <= fsync p99 + 1 ms) is judged from the bounds without flattering it.
- ``--trace`` runs the server under ``benchmarks/_traced_server.py`` and splits every order's
  time exactly (not in buckets): waiting for the sync in flight, its own sync, the gateway's part.
- Metrics cost: the maximum-throughput run repeated against a server started with
  ``--no-stats`` (no order-path counters).
Last line: ``ratio_vs_echo=<x.xx>``: best engine orders/s over best echo messages/s.

    python benchmarks/bench_gateway.py            # full: N = 1, 10, 100, 1000; 3,700 members
    python benchmarks/bench_gateway.py --quick    # a smoke run of a few seconds
    python benchmarks/bench_gateway.py --latency-only --rate 5000 --trace   # the latency target only
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

INSTRUMENT = "CEA25"
PRICE = 9250


def pin(cores: set[int]) -> None:
    try:
        available = os.sched_getaffinity(0)
        chosen = cores & available
        if chosen and len(available) > 1:
            os.sched_setaffinity(0, chosen)
    except (AttributeError, OSError):
        pass


def server_cores() -> tuple[set[int], set[int]]:
    """The server gets one core, the generators the others: the core that takes the block
    device's interrupts if there is one (then a sync's submission and completion both run on the
    server's own core, and a busy generator core cannot slow the completions), else the first."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    if len(cores) < 2:
        return set(cores), set(cores)
    counts = disk_irq_counts()
    chosen = max(cores, key=lambda c: counts.get(c, 0)) if any(counts.get(c, 0) for c in cores) else cores[0]
    return {chosen}, set(cores) - {chosen}


# ---------------------------------------------------------------------------------------------
# Configuration


def member_id(i: int) -> str:
    return f"E{i:04d}"


def write_config(path: Path, members: int, writer_nice: int | None = None) -> None:
    from engine import hash_token

    lines = [
        "initial_cash = 1_000_000_000_000", "initial_allowances = 1_000_000_000", "open_on_start = true", "",
        "[market]", 'first_trading_day = "2026-11-24"', "",
        "[gateway]", "max_msgs_per_s = 1_000_000", 'durability = "fsync"', "max_outbound_bytes = 67_108_864",
        "max_sessions_per_member = 4", "snapshot_every = 10_000_000",
        *([f"writer_nice = {writer_nice}"] if writer_nice is not None else []), "",
        "[[instruments]]", f'symbol = "{INSTRUMENT}"', 'currency = "CNY"', f"reference_price = {PRICE}",
        "max_qty = 99_999", "band_bp = 1_000", "",
    ]
    for i in range(members):
        m = member_id(i)
        lines += ["[[members]]", f'id = "{m}"', f'token_sha256 = "{hash_token(m + "-token")}"', ""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


def start_gateway(config: Path, data: Path, port: int, metrics_port: int, stats: bool, cores: set[int],
                  trace: Path | None = None):
    launcher = ["-m", "gateway"] if trace is None else [str(REPO / "benchmarks" / "_traced_server.py")]
    cmd = [sys.executable, *launcher, "serve", "--config", str(config), "--data-dir", str(data),
           "--port", str(port), "--metrics-port", str(metrics_port)]
    if not stats:
        cmd.append("--no-stats")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if trace is not None:
        env["KABONI_TRACE"] = str(trace)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: pin(cores))
    wait_port(port, proc)
    return proc


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def echo_main(port: int, cores: set[int]) -> None:
    """The loopback ceiling: parse the same 4-byte framing and echo every frame."""
    import uvloop

    pin(cores)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.buf = bytearray()

        def data_received(self, data):
            buf = self.buf
            buf += data
            pos, n = 0, len(buf)
            while n - pos >= 4:
                length = int.from_bytes(buf[pos:pos + 4], "big")
                if n - pos - 4 < length:
                    break
                pos += 4 + length
            if pos:
                self.t.write(bytes(buf[:pos]))
                del buf[:pos]

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
        gc.freeze()
        stop_ = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop_.set)
        await stop_.wait()
        server.close()

    uvloop.run(main())


def scrape(port: int, metric: str = "kaboni_journal_fsync_seconds") -> dict[str, float]:
    """Cumulative bucket counts {le: count} of one histogram on the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    prefix = metric + "_bucket"
    for line in text.splitlines():
        if line.startswith(prefix + "{"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantile(before: dict, after: dict, q: float) -> float:
    """Upper bound of the bucket holding quantile q of the observations between two scrapes."""
    return bucket_range(before, after, q)[1]


def bucket_range(before: dict, after: dict, q: float) -> tuple[float, float]:
    """(lower, upper] bounds of the bucket holding quantile q between two scrapes."""
    bounds = sorted(((float("inf") if k == "+Inf" else float(k)), after[k] - before.get(k, 0.0)) for k in after)
    total = bounds[-1][1]
    if total <= 0:
        return float("nan"), float("nan")
    lower = 0.0
    for bound, cum in bounds:
        if cum >= q * total:
            return lower, bound
        lower = bound
    return lower, float("inf")


def verdict(server: tuple[float, float], fsync: tuple[float, float], margin: float = 0.001) -> str:
    """The latency target, read off bucket bounds without flattering it: met only if the worst
    case the buckets allow (server p99 at its bucket's top, fsync p99 at its bucket's bottom) is
    within the margin; not met only if the best case is not."""
    if server[1] - fsync[0] <= margin:
        return "met"
    if server[0] - fsync[1] > margin:
        return "NOT met"
    return "undecided (buckets too coarse)"


# ---------------------------------------------------------------------------------------------
# Load generators (separate processes)


class Reply(msgspec.Struct):
    type: str
    cl_ord_id: str = ""


_reply = msgspec.msgpack.Decoder(Reply)
_enc = msgspec.msgpack.Encoder()
ACK = frozenset({"OrderAccepted", "OrderRejected", "NewOrder"})  # NewOrder: the echo server's reply


def order_frame(cl: str, side: str) -> bytes:
    body = _enc.encode({"type": "NewOrder", "cl_ord_id": cl, "instrument": INSTRUMENT, "side": side, "qty": 1,
                        "price": PRICE, "tif": "day"})
    return len(body).to_bytes(4, "big") + body


class Conn(asyncio.Protocol):
    def __init__(self, gen: "Generator", member: str) -> None:
        self.gen = gen
        self.member = member
        self.buf = bytearray()
        self.logged_on = asyncio.get_running_loop().create_future()
        self.sent: dict[str, int] = {}
        self.last_sent = time.monotonic()
        self.side = 0
        self.counter = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        body = _enc.encode({"type": "Logon", "member": self.member, "token": self.member + "-token",
                            "heartbeat_s": 5})
        transport.write(len(body).to_bytes(4, "big") + body)

    def data_received(self, data):
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        now = time.perf_counter_ns()
        gen = self.gen
        while n - pos >= 4:
            length = int.from_bytes(buf[pos:pos + 4], "big")
            if n - pos - 4 < length:
                break
            msg = _reply.decode(buf[pos + 4:pos + 4 + length])
            pos += 4 + length
            if msg.type in ACK:
                t0 = self.sent.pop(msg.cl_ord_id, None)
                if t0 is not None:
                    gen.acked += 1
                    if gen.record:
                        gen.latencies.append(now - t0)
                    if gen.window:
                        self.send_order(None)
            elif not self.logged_on.done() and msg.type != "Heartbeat":
                self.logged_on.set_result(msg.type)
        if pos:
            del buf[:pos]

    def send_order(self, t0: int | None) -> None:
        self.counter += 1
        cl = f"{self.gen.phase}-{self.counter}"
        self.side ^= 1
        self.sent[cl] = t0 if t0 is not None else time.perf_counter_ns()
        self.transport.write(order_frame(cl, "buy" if self.side else "sell"))
        self.last_sent = time.monotonic()

    def heartbeat(self, now: float) -> None:
        if now - self.last_sent >= 2.5 and not self.transport.is_closing():
            body = _enc.encode({"type": "Heartbeat"})
            self.transport.write(len(body).to_bytes(4, "big") + body)
            self.last_sent = now


class Generator:
    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.acked = 0
        self.latencies: list[int] = []
        self.record = False
        self.window = False
        self.phase = "p"

    async def connect(self, port: int, members: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for i in range(0, len(members), 50):
            batch = []
            for m in members[i:i + 50]:
                _, conn = await loop.create_connection(lambda m=m: Conn(self, m), "127.0.0.1", port)
                batch.append(conn)
            for conn in batch:
                await asyncio.wait_for(conn.logged_on, 60)
            self.conns += batch
        loop.create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        """Heartbeat idle sessions a slice at a time, with random phases, so 3,700 sessions do not
        all write (and get echoed) in the same millisecond."""
        import random

        now = time.monotonic()
        for c in self.conns:
            c.last_sent = now - random.uniform(0, 2.5)
        slices = 25
        k = 0
        while True:
            await asyncio.sleep(0.5 / slices)
            now = time.monotonic()
            for c in self.conns[k::slices]:
                c.heartbeat(now)
            k = (k + 1) % slices

    async def throughput(self, active: int, window: int, seconds: float, phase: str) -> tuple[int, float]:
        self.phase, self.acked, self.window, self.record = phase, 0, True, False
        conns = self.conns[:active]
        t0 = time.perf_counter()
        for c in conns:
            for _ in range(window):
                c.send_order(None)
        await asyncio.sleep(seconds)
        self.window = False
        done, elapsed = self.acked, time.perf_counter() - t0
        await self._settle(conns)
        return done, elapsed

    async def latency(self, active: int, rate: float, seconds: float, phase: str) -> list[int]:
        """Open loop: order k is due at start + k / rate, sent by session k % active."""
        self.phase, self.acked, self.window, self.record = phase, 0, False, True
        self.latencies = []
        conns = self.conns[:active]
        total = int(rate * seconds)
        start = time.perf_counter_ns()
        step = 1e9 / rate
        k = 0
        while k < total:
            now = time.perf_counter_ns()
            while k < total and start + k * step <= now:
                conns[k % active].send_order(int(start + k * step))
                k += 1
            await asyncio.sleep(0.0005)
        await self._settle(conns)
        self.record = False
        lost = sum(len(c.sent) for c in conns)
        return self.latencies + [10**12] * lost  # unanswered orders count as "very late"

    async def _settle(self, conns, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while any(c.sent for c in conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def generator_main(pipe, cores: set[int]) -> None:
    import uvloop

    pin(cores)

    async def main():
        gen = Generator()
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        while True:
            cmd, *args = await loop.run_in_executor(None, pipe.recv)
            if cmd == "connect":
                await gen.connect(*args)
                pipe.send("ok")
            elif cmd == "throughput":
                pipe.send(await gen.throughput(*args))
            elif cmd == "latency":
                pipe.send(await gen.latency(*args))
            elif cmd == "quit":
                for c in gen.conns:
                    c.transport.close()
                pipe.send("bye")
                return

    uvloop.run(main())


class Load:
    """Load generator processes, each driving its share of the sessions."""

    def __init__(self, procs: int, cores: set[int]) -> None:
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for _ in range(procs):
            a, b = ctx.Pipe()
            p = ctx.Process(target=generator_main, args=(b, cores), daemon=True)
            p.start()
            self.pipes.append(a)
            self.procs.append(p)

    def call(self, per_gen_args: list[tuple]) -> list:
        for pipe, args in zip(self.pipes, per_gen_args):
            pipe.send(args)
        return [pipe.recv() for pipe in self.pipes]

    def connect(self, port: int, members: list[str]) -> None:
        k = len(self.pipes)
        self.call([("connect", port, members[i::k]) for i in range(k)])

    def split(self, n: int) -> list[int]:
        k = len(self.pipes)
        return [n // k + (1 if i < n % k else 0) for i in range(k)]

    def throughput(self, active: int, window: int, seconds: float, phase: str) -> float:
        shares = self.split(active)
        res = self.call([("throughput", s, window, seconds, phase) if s else ("throughput", 0, 0, seconds, phase)
                         for s in shares])
        return sum(d for d, _ in res) / max(e for _, e in res)

    def latency(self, active: int, rate: float, seconds: float, phase: str) -> list[int]:
        shares = self.split(active)
        res = self.call([("latency", s, rate * s / active, seconds, phase) if s else ("latency", 1, 0.0001, 0, phase)
                         for s in shares])
        return sorted(x for r in res for x in r)

    def quit(self) -> None:
        self.call([("quit",)] * len(self.pipes))
        for p in self.procs:
            p.join(10)


def pct(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e6


# ---------------------------------------------------------------------------------------------


def inprocess_stats_cost(orders: int = 20_000, reps: int = 4) -> tuple[float, float]:
    """CPU microseconds per order through the exchange core (real Ledger, durability "none",
    sinks that drop bytes), with and without the order-path counters: (on, off), best of reps.
    Deterministic enough on a shared machine, unlike two separate server runs."""
    from engine import demo_config
    from engine.journal import Ledger
    from gateway._exchange import Exchange
    from gateway._metrics import Stats

    class Sink:
        def write(self, b): pass
        def close(self): pass
        abort = close

    def frame_(m):
        b = _enc.encode(m)
        return len(b).to_bytes(4, "big") + b

    cfg = demo_config()
    cfg = msgspec.structs.replace(cfg, gateway=msgspec.structs.replace(cfg.gateway, max_msgs_per_s=10**9))

    def one(enabled: bool) -> float:
        with tempfile.TemporaryDirectory() as d:
            ledger = Ledger.open(cfg, d, durability="none", today="2026-11-24")
            ex = Exchange(cfg, ledger, clock_ns=time.time_ns, stats=Stats(enabled))
            sessions = []
            for m in ("M01", "M02"):
                sess = ex.connect(Sink(), 0.0)
                ex.data_received(sess, frame_({"type": "Logon", "member": m, "token": m + "-token"}), 0.0)
                sessions.append(sess)
            frames = [[frame_({"type": "NewOrder", "cl_ord_id": f"{k}-{i}", "instrument": "CEA25",
                               "side": "buy" if k == 0 else "sell", "qty": 1, "price": 9250})
                       for i in range(orders)] for k in range(2)]
            gc.collect()
            t = time.process_time()
            for i in range(0, orders, 10):
                for k in range(2):
                    ex.data_received(sessions[k], b"".join(frames[k][i:i + 10]), 0.0)
                ex.release(ledger.last_seq)
            dt = time.process_time() - t
            ledger.close()
            return dt / (2 * orders) * 1e6

    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(reps):
        for enabled in (False, True):
            runs[enabled].append(one(enabled))
    return min(runs[True]), min(runs[False])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def disk_irq_counts() -> dict[int, int]:
    """Interrupts per core of the block devices (virtio, NVMe, SCSI): the core that takes them
    also runs the I/O completion work the journal's syncs wait for."""
    import re

    try:
        lines = Path("/proc/interrupts").read_text().splitlines()
    except OSError:
        return {}
    cpus = [int(c[3:]) for c in lines[0].split() if c.startswith("CPU") and c[3:].isdigit()]
    totals = dict.fromkeys(cpus, 0)
    for line in lines[1:]:
        if re.search(r"virtio\d+-req|nvme|ahci|scsi|blkif", line):
            for cpu, f in zip(cpus, line.split()[1:1 + len(cpus)]):
                if f.isdigit():
                    totals[cpu] += int(f)
    return totals


def run_queue(pid: int) -> tuple[float, int]:
    """(seconds the process's threads spent runnable but not running, involuntary context
    switches), from /proc: how much a neighbour on the server's core delayed it."""
    wait, switches = 0.0, 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan"), 0
    for task in tasks:
        try:  # a thread may end between the listing and the reads
            wait += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[1]) / 1e9
            for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                if line.startswith("nonvoluntary_ctxt_switches"):
                    switches += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return wait, switches


def measure_throughput(load: Load, pid: int, n: int, window: int, seconds: float, phase: str) -> tuple[float, float]:
    """(orders/s, server CPU microseconds per order)."""
    c0 = cpu_seconds(pid)
    before = time.perf_counter()
    rate = load.throughput(n, window, seconds, phase)
    elapsed = time.perf_counter() - before
    c1 = cpu_seconds(pid)
    return rate, (c1 - c0) / max(rate * elapsed, 1) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: 200 members, N = 1, 10, 100")
    ap.add_argument("--members", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--generators", type=int, default=2)
    ap.add_argument("--n", type=int, action="append", help="only this N (repeatable)")
    ap.add_argument("--rate", type=int, action="append", help="only this offered rate (repeatable)")
    ap.add_argument("--latency-only", action="store_true",
                    help="the gateway's latency runs only: no throughput, echo or metrics-cost runs")
    ap.add_argument("--server-core", type=int, help="pin the server to this core (default: the one taking the "
                    "block device's interrupts, else the first), the generators to the others")
    ap.add_argument("--no-pin", action="store_true", help="let the server and the generators use every core")
    ap.add_argument("--trace", action="store_true",
                    help="run the server under benchmarks/_traced_server.py and split each latency run's "
                         "orders into the journal's part and the gateway's (exact times, not buckets)")
    ap.add_argument("--trace-out", type=Path, help="with --trace: keep the server's events in this file")
    ap.add_argument("--repeat", type=int, default=1, help="latency runs per N and rate")
    ap.add_argument("--writer-nice", type=int, help="[gateway] writer_nice for the server (default: the "
                                                    "configuration's default, -10)")
    args = ap.parse_args()
    members = args.members or (200 if args.quick else 3_700)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    ns = [n for n in (1, 10, 100, 1000) if n <= members]
    if args.quick:
        ns = [n for n in ns if n <= 100]
    rates = [1_000, 5_000] if not args.quick else [5_000]
    if args.n:
        ns = args.n
    if args.rate:
        rates = args.rate
    reps = 1 if args.quick else 2
    window = 8
    srv_cores, gen_cores = server_cores()
    if args.server_core is not None and args.server_core in srv_cores | gen_cores:
        srv_cores, gen_cores = {args.server_core}, (srv_cores | gen_cores) - {args.server_core}
    if args.no_pin:
        srv_cores = gen_cores = srv_cores | gen_cores
    tmp = Path(tempfile.mkdtemp(prefix="kaboni-bench-"))
    config = tmp / "bench.toml"
    write_config(config, members, args.writer_nice)
    ids = [member_id(i) for i in range(members)]
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"# bench_gateway: members={members} sessions_logged_on={members} N={ns} rates={rates} "
          f"seconds={seconds} window/session={window} generators={args.generators} "
          f"server_cores={sorted(srv_cores)} generator_cores={sorted(gen_cores)} fsync=on", flush=True)
    print(f"# block device interrupts per core: {disk_irq_counts() or 'unknown'}", flush=True)
    engine_rate: dict[int, float] = {}
    echo_rate: dict[int, float] = {}
    proc = None
    try:
        # ---- the gateway (metrics on), every member logged on and heartbeating
        port, mport = free_port(), free_port()
        t = time.perf_counter()
        trace = (args.trace_out or tmp / "trace.jsonl") if args.trace else None
        windows: list[tuple[str, float, float]] = []
        proc = start_gateway(config, tmp / "data", port, mport, True, srv_cores, trace)
        print(f"# server up in {time.perf_counter() - t:.1f} s (journal created, {members} members funded)", flush=True)
        load = Load(args.generators, gen_cores)
        t = time.perf_counter()
        load.connect(port, ids)
        print(f"# {members} sessions logged on in {time.perf_counter() - t:.1f} s", flush=True)
        for n in ns:
            if args.latency_only:
                load.throughput(n, window, 0.5, f"w{n}")  # warm-up only
            else:
                rate, cpu = measure_throughput(load, proc.pid, n, max(window, 800 // n), seconds, f"t{n}")
                engine_rate[n] = rate
                print(f"engine  N={n:<5} max_orders_per_s={rate:,.0f}  server_cpu_per_order={cpu:.1f} us", flush=True)
            for r, rep in ((r, rep) for r in rates for rep in range(args.repeat)):
                before = scrape(mport)
                before_srv = scrape(mport, "kaboni_order_to_report_latency_seconds")
                rq0 = run_queue(proc.pid)
                w0 = time.monotonic()
                lat = load.latency(n, r, seconds, f"l{n}-{r}-{rep}")
                windows.append((f"N={n:<5} offered={r:>6}/s", w0, time.monotonic()))
                after = scrape(mport)
                after_srv = scrape(mport, "kaboni_order_to_report_latency_seconds")
                rq1 = run_queue(proc.pid)
                fs_range = bucket_range(before, after, 0.99)
                s99_range = bucket_range(before_srv, after_srv, 0.99)
                fs = fs_range[1]
                s50 = bucket_quantile(before_srv, after_srv, 0.5)
                s99 = s99_range[1]
                print(f"engine  N={n:<5} offered={r:>6}/s  p50={pct(lat, .5):.3f} ms  p99={pct(lat, .99):.3f} ms  "
                      f"p99.9={pct(lat, .999):.3f} ms  (orders={len(lat)}; journal fsync p99 <= {fs * 1e3:.3f} ms; "
                      f"server's own bytes-in to report-out p50 <= {s50 * 1e3:.3f} ms, p99 <= {s99 * 1e3:.3f} ms; "
                      f"load {os.getloadavg()[0]:.2f}; server threads runnable but not running "
                      f"{(rq1[0] - rq0[0]) * 1e3:.1f} ms, {rq1[1] - rq0[1]} involuntary switches) "
                      f"target (server p99 <= fsync p99 + 1 ms): {verdict(s99_range, fs_range)}",
                      flush=True)
        load.quit()
        stop(proc)
        if trace is not None:
            from _traced_server import analyze

            for label, w0, w1 in windows:
                a = analyze(str(trace), w0, w1)
                print(f"trace   {label} orders={a['orders']} server p50={a['server_p50']:.3f} p99={a['server_p99']:.3f} ms | "
                      f"fsync per batch p50={a['fsync_batch_p50']:.3f} p99={a['fsync_batch_p99']:.3f}, per order "
                      f"p99={a['fsync_order_p99']:.3f} ms | per order p99: wait for the sync in flight "
                      f"{a['wait_prev_p99']:.3f}, journal (append to durable) {a['journal_p99']:.3f}, gateway (rest) "
                      f"{a['gateway_p99']:.3f}, durable to written {a['durable_to_written_p99']:.3f} ms | syncs > 1 ms: "
                      f"{a['slow_sync_time_share'] * 100:.0f}% of sync time, writer runnable-not-running "
                      f"{a['slow_sync_runnable_share'] * 100:.0f}% of that | reads with several orders {a['bursts']}, "
                      f"{a['split_bursts']} of them split over two batches | max tick {a['tick_max']:.2f} ms, "
                      f"max gc {a['gc_max']:.2f} ms", flush=True)
        if args.latency_only:
            print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
            return 0
        # ---- the loopback ceiling: same clients, echo server
        eport = free_port()
        ctx = mp.get_context("spawn")
        echo = ctx.Process(target=echo_main, args=(eport, srv_cores), daemon=True)
        echo.start()
        wait_port(eport, None)
        load = Load(args.generators, gen_cores)
        load.connect(eport, ids)
        for n in ns:
            rate, _ = measure_throughput(load, echo.pid, n, max(window, 800 // n), seconds, f"e{n}")
            echo_rate[n] = rate
            print(f"echo    N={n:<5} max_msgs_per_s={rate:,.0f}   engine/echo={engine_rate[n] / rate:.2f}", flush=True)
            for r in rates:
                lat = load.latency(n, r, seconds, f"el{n}-{r}")
                print(f"echo    N={n:<5} offered={r:>6}/s  p50={pct(lat, .5):.3f} ms  p99={pct(lat, .99):.3f} ms  "
                      f"p99.9={pct(lat, .999):.3f} ms  (the clients' own floor)", flush=True)
        load.quit()
        os.kill(echo.pid, signal.SIGTERM)
        echo.join(10)
        # ---- metrics cost: alternate servers with and without the order-path counters
        nm = 100 if 100 in ns else ns[-1]
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for rep in range(reps):
            for stats in (False, True):
                port2 = free_port()
                data = tmp / f"data-{rep}-{'on' if stats else 'off'}"
                proc = start_gateway(config, data, port2, free_port(), stats, srv_cores)
                load = Load(args.generators, gen_cores)
                load.connect(port2, ids[:nm])
                load.throughput(nm, window, 0.5, "warm")
                runs[stats].append(measure_throughput(load, proc.pid, nm, window, seconds, "m"))
                load.quit()
                stop(proc)
        on_rate = max(r for r, _ in runs[True])
        off_rate = max(r for r, _ in runs[False])
        on_cpu = min(c for _, c in runs[True])
        off_cpu = min(c for _, c in runs[False])
        print(f"metrics N={nm}: orders/s on {on_rate:,.0f} off {off_rate:,.0f} ({(off_rate - on_rate) / off_rate * 100:+.1f}%); "
              f"server CPU/order on {on_cpu:.1f} us off {off_cpu:.1f} us ({(on_cpu - off_cpu) / off_cpu * 100:+.1f}%); "
              f"best of {reps} alternating runs each", flush=True)
        on_us, off_us = inprocess_stats_cost(reps=2 if args.quick else 4)
        print(f"metrics in-process (exchange core + ledger, no IO): {on_us:.2f} us/order on, {off_us:.2f} us/order off "
              f"({(on_us - off_us) / off_us * 100:+.1f}%)", flush=True)
    finally:
        if proc is not None and proc.poll() is None:  # a failed run must not leave its server behind
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    ratio = max(engine_rate.values()) / max(echo_rate.values())
    print(f"ratio_vs_echo={ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
