"""Market configuration: instruments, members, the trading calendar and schedule, loaded from TOML.

msgspec decodes the file into typed Structs; semantic checks follow. Any problem raises
``ConfigError`` naming the file, the key and what is wrong, so a bad file fails at load and
never half-starts an exchange.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import tomllib
import zoneinfo
from pathlib import Path

import msgspec

__all__ = [
    "ConfigError", "InstrumentConfig", "MemberConfig", "MarketConfig", "GatewayConfig",
    "ScheduleConfig", "ExchangeConfig", "time_of_day", "session_bounds", "load_config", "parse_config", "demo_config", "hash_token",
    "price_band", "DEMO_TOML", "MAX_AMOUNT", "MAX_PRICE",
]


class ConfigError(ValueError):
    """A configuration file is unreadable or inconsistent."""


class InstrumentConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    symbol: str
    currency: str
    reference_price: int
    tick: int = 1
    qty_step: int = 1
    min_qty: int = 1
    max_qty: int | None = 99_999
    band_bp: int = 1_000
    fee_bp: int = 0
    holding_limit: int | None = None


class MemberConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str
    token_sha256: str
    role: str = "member"


class MarketConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    first_trading_day: str | None = None
    holidays: list[str] = []
    weekend: list[int] = msgspec.field(default_factory=lambda: [5, 6])
    fee_account: str = "EXCHANGE"


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: str = "127.0.0.1"
    port: int = 7001
    metrics_port: int = 9101
    data_dir: str = "./kaboni-data"
    max_frame: int = 65_536
    max_sessions_per_member: int = 4
    max_msgs_per_s: int = 1_000
    logon_timeout_s: float = 5.0
    max_outbound_bytes: int = 8 * 1024 * 1024
    durability: str = "fsync"
    snapshot_every: int = 100_000
    tls_cert: str | None = None
    tls_key: str | None = None
    # nice value of the journal's writer thread at moderate load: ahead of the busy event loop
    # on a shared core, its syncs start and are reported sooner (gateway WriterPriority,
    # benchmarks/RESULTS.md); 0 leaves it alone
    writer_nice: int = -10
    # Flood guards (gateway/_guard.py, docs/operations.md "Flood guards"): what one session, one
    # member or one peer address can cost everyone else. 0 turns a guard off.
    throttle_abuse_factor: int = 5       # throttled requests beyond this many times max_msgs_per_s: cut off
    throttle_cooldown_s: float = 10.0    # logons of a member refused after a throttle-abuse disconnect
    max_connections: int = 10_000        # connections held at once, logged on or not
    max_pending_logons: int = 1_000      # connections not (yet) logged on
    max_pending_per_peer: int = 64       # of those, from one peer address (an IPv6 /64)
    logon_failures_per_peer: int = 20    # bad_credentials from one peer within logon_block_s ...
    logon_block_s: float = 60.0          # ... refuse its connections for this long


class ScheduleConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """When the gateway itself opens and closes the market and ends the day: local times on
    each trading day, "HH:MM" or "HH:MM:SS". Nothing set: operators do all of it by hand. Not
    part of the engine's configuration digest: the journal records the commands themselves."""

    timezone: str = "UTC"  # an IANA zone name, e.g. "Asia/Shanghai"
    sessions: list[str] = []  # continuous trading windows, "09:30-11:30", in order
    end_of_day: str | None = None  # EndOfDay (after a CloseMarket if anything is open)

    @property
    def active(self) -> bool:
        return bool(self.sessions) or self.end_of_day is not None


class ExchangeConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    instruments: list[InstrumentConfig]
    members: list[MemberConfig] = []
    market: MarketConfig = MarketConfig()
    gateway: GatewayConfig = GatewayConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    # Funding applied once, when a journal is created (demo and test set-ups).
    initial_cash: int = 0
    initial_allowances: int = 0
    open_on_start: bool = False

    @property
    def currencies(self) -> list[str]:
        seen: dict[str, None] = {}
        for ins in self.instruments:
            seen.setdefault(ins.currency, None)
        return list(seen)

    def instrument(self, symbol: str) -> InstrumentConfig:
        for ins in self.instruments:
            if ins.symbol == symbol:
                return ins
        raise KeyError(symbol)


def hash_token(token: str) -> str:
    """Tokens are stored as SHA-256 hex digests, never in the clear."""
    return hashlib.sha256(token.encode()).hexdigest()


MAX_AMOUNT = 2**63 - 1
"""The most cash (minor units) or allowances (tonnes) the exchange holds of one currency or
instrument, all accounts together. Every balance, reservation, price and quantity a client sees
is then a signed 64-bit integer, whatever language the client is written in."""


MAX_PRICE = (1 << 62) - 1
"""The highest price a band may reach: the order book keeps 1 << 62 as the key of an empty side."""


def price_band(reference: int, band_bp: int, tick: int) -> tuple[int, int]:
    """Inclusive (lower, upper) limits in integer arithmetic, as the market rules define them."""
    upper = reference * (10_000 + band_bp) // (10_000 * tick) * tick
    lower = -(-reference * (10_000 - band_bp) // (10_000 * tick)) * tick
    return lower, upper


# Bounds that only refuse the absurd (a frame of 1 byte, a send buffer of 1 byte): tests of the
# limits themselves may set them low
# bytes: the limit holds for the server's own frames too. Its reports and replies are a few
# hundred bytes at most (texts quoting a client's strings are cut short), a BookSnapshot is cut
# to fit, and a Balances reply is checked against the instruments
MIN_FRAME = 1024
MIN_OUTBOUND = 256  # bytes: below this a single Balances reply is a slow consumer


def is_day(text: str) -> bool:
    """Whether ``text`` is a date written exactly YYYY-MM-DD: days are compared and journaled as
    such strings (``date.fromisoformat`` also takes 20261124 and 2026-W48-2)."""
    try:
        return _dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?")


def time_of_day(text: str) -> int | None:
    """Seconds after midnight of "HH:MM" or "HH:MM:SS" (00:00 to 23:59:59); None if malformed."""
    m = _TIME_OF_DAY.fullmatch(text)
    if m is None:
        return None
    return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3] or 0)


def session_bounds(window: str) -> tuple[int, int] | None:
    """(start, end) seconds after midnight of a "HH:MM-HH:MM" trading session; None if malformed."""
    start_text, dash, end_text = window.partition("-")
    start, end = time_of_day(start_text.strip()), time_of_day(end_text.strip())
    if not dash or start is None or end is None:
        return None
    return start, end


def _check_schedule(schedule: ScheduleConfig, source: str) -> None:
    try:
        zoneinfo.ZoneInfo(schedule.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _fail(source, "schedule.timezone", f"{schedule.timezone!r} is not a known time zone "
                                                 "(an IANA name such as 'Asia/Shanghai')") from None
    last_end = -1
    for i, window in enumerate(schedule.sessions):
        bounds = session_bounds(window)
        if bounds is None:
            raise _fail(source, f"schedule.sessions[{i}]", f"{window!r} is not 'HH:MM-HH:MM'")
        start, end = bounds
        if start >= end:
            raise _fail(source, f"schedule.sessions[{i}]", f"{window!r} ends before it starts (sessions "
                                                             "cannot span midnight)")
        if start <= last_end:
            raise _fail(source, f"schedule.sessions[{i}]", f"{window!r} does not start after the "
                                                             "previous session ends")
        last_end = end
    if schedule.end_of_day is not None:
        eod = time_of_day(schedule.end_of_day)
        if eod is None:
            raise _fail(source, "schedule.end_of_day", f"{schedule.end_of_day!r} is not 'HH:MM'")
        if eod < last_end:
            raise _fail(source, "schedule.end_of_day", f"{schedule.end_of_day!r} is before the last session ends")


def _largest_balances(config: ExchangeConfig) -> int:
    """Bytes of the largest Balances frame body the configuration allows (every amount at its
    widest): frames the server sends must fit in max_frame too."""
    from ._messages import AllowanceBalance, Balances, CashBalance

    big = -(2**63)
    body = msgspec.msgpack.encode(Balances(
        {c: CashBalance(big, big, big, big) for c in config.currencies},
        {i.symbol: AllowanceBalance(big, big, big, big) for i in config.instruments}))
    return len(body)


def _fail(source: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {what}")


def _check(config: ExchangeConfig, source: str) -> ExchangeConfig:
    if not config.instruments:
        raise _fail(source, "instruments", "at least one instrument is required")
    symbols: set[str] = set()
    for i, ins in enumerate(config.instruments):
        key = f"instruments[{i}]"
        if not ins.symbol or not ins.symbol.isprintable() or len(ins.symbol) > 32:
            raise _fail(source, f"{key}.symbol", f"{ins.symbol!r} is not a valid symbol")
        if ins.symbol in symbols:
            raise _fail(source, f"{key}.symbol", f"duplicate instrument {ins.symbol!r}")
        symbols.add(ins.symbol)
        if not (len(ins.currency) == 3 and ins.currency.isascii() and ins.currency.isalpha()
                and ins.currency.isupper()):
            raise _fail(source, f"{key}.currency", f"{ins.currency!r} is not a currency code (three capital "
                                                   "letters, as CNY)")
        for name in ("tick", "qty_step", "min_qty", "reference_price"):
            if getattr(ins, name) <= 0:
                raise _fail(source, f"{key}.{name}", f"must be positive, got {getattr(ins, name)}")
        for name in ("tick", "qty_step", "min_qty", "max_qty", "reference_price", "holding_limit"):
            if (getattr(ins, name) or 0) > MAX_AMOUNT:
                raise _fail(source, f"{key}.{name}", f"must be at most {MAX_AMOUNT}, got {getattr(ins, name)}")
        if ins.min_qty % ins.qty_step:
            raise _fail(source, f"{key}.min_qty", f"{ins.min_qty} is not a multiple of qty_step {ins.qty_step}")
        if ins.max_qty is not None and ins.max_qty < ins.min_qty:
            raise _fail(source, f"{key}.max_qty", f"{ins.max_qty} is below min_qty {ins.min_qty}")
        if ins.max_qty is not None and ins.max_qty % ins.qty_step:
            raise _fail(source, f"{key}.max_qty", f"{ins.max_qty} is not a multiple of qty_step {ins.qty_step}")
        if ins.reference_price % ins.tick:
            raise _fail(source, f"{key}.reference_price", f"{ins.reference_price} is not on the tick {ins.tick}")
        if not 0 <= ins.band_bp < 10_000:
            raise _fail(source, f"{key}.band_bp", f"must be in 0..9999, got {ins.band_bp}")
        if not 0 <= ins.fee_bp <= 10_000:
            raise _fail(source, f"{key}.fee_bp", f"must be in 0..10000, got {ins.fee_bp}")
        if ins.holding_limit is not None and ins.holding_limit <= 0:
            raise _fail(source, f"{key}.holding_limit", f"must be positive, got {ins.holding_limit}")
        lower, upper = price_band(ins.reference_price, ins.band_bp, ins.tick)
        if lower > upper or lower <= 0:
            raise _fail(source, f"{key}.band_bp", "leaves no valid price around the reference price")
        if upper > MAX_PRICE:
            raise _fail(source, f"{key}.reference_price", f"its band reaches {upper}, above {MAX_PRICE}")
    currencies = set(config.currencies)
    for i, ins in enumerate(config.instruments):
        if ins.symbol in currencies:  # a Deposit's asset names either: it would always be the cash
            raise _fail(source, f"instruments[{i}].symbol", f"{ins.symbol!r} is also a currency code")
    fee_account = config.market.fee_account
    if not fee_account or not fee_account.isprintable() or len(fee_account) > 32:
        raise _fail(source, "market.fee_account", f"{fee_account!r} is not a valid account name")
    if fee_account in symbols or fee_account in currencies:
        raise _fail(source, "market.fee_account", f"{fee_account!r} clashes with an instrument or currency")
    ids: set[str] = set()
    for i, m in enumerate(config.members):
        key = f"members[{i}]"
        if not m.id or not m.id.isprintable() or len(m.id) > 32:
            raise _fail(source, f"{key}.id", f"{m.id!r} is not a valid member id")
        if m.id in ids:
            raise _fail(source, f"{key}.id", f"duplicate member {m.id!r}")
        if m.id == config.market.fee_account:
            raise _fail(source, f"{key}.id", f"{m.id!r} is the fee account's name")
        if m.id in symbols or m.id in currencies:
            raise _fail(source, f"{key}.id", f"{m.id!r} clashes with an instrument or currency")
        ids.add(m.id)
        if m.role not in ("member", "operator"):
            raise _fail(source, f"{key}.role", f"must be 'member' or 'operator', got {m.role!r}")
        if len(m.token_sha256) != 64 or any(c not in "0123456789abcdef" for c in m.token_sha256):
            raise _fail(source, f"{key}.token_sha256", "must be 64 lowercase hex digits (sha256 of the token)")
    market = config.market
    for name, value in [("market.first_trading_day", market.first_trading_day)] + [
        (f"market.holidays[{i}]", h) for i, h in enumerate(market.holidays)
    ]:
        if value is not None:
            if not is_day(value):
                raise _fail(source, name, f"{value!r} is not a YYYY-MM-DD date")
    if any(not 0 <= d <= 6 for d in market.weekend) or len(set(market.weekend)) >= 7:
        raise _fail(source, "market.weekend", "must list weekday numbers 0 (Mon) to 6 (Sun), not all of them")
    first = market.first_trading_day
    if first is not None and (first in market.holidays or _dt.date.fromisoformat(first).weekday() in market.weekend):
        raise _fail(source, "market.first_trading_day", f"{first} is not a business day (weekend or holidays)")
    _check_schedule(config.schedule, source)
    gw = config.gateway
    if gw.durability not in ("fsync", "none"):
        raise _fail(source, "gateway.durability", f"must be 'fsync' or 'none', got {gw.durability!r}")
    if not MIN_FRAME <= gw.max_frame <= 2**32 - 1:
        raise _fail(source, "gateway.max_frame", f"must be in {MIN_FRAME}..{2**32 - 1}, got {gw.max_frame}")
    balances = _largest_balances(config)
    if balances > gw.max_frame:
        raise _fail(source, "gateway.max_frame", f"{gw.max_frame} is too small for a Balances reply of these "
                                                 f"{len(config.instruments)} instruments ({balances} bytes)")
    if gw.max_outbound_bytes < MIN_OUTBOUND:
        raise _fail(source, "gateway.max_outbound_bytes", f"must be at least {MIN_OUTBOUND}, got {gw.max_outbound_bytes}")
    if not gw.host:
        raise _fail(source, "gateway.host", "must name an address to listen on")
    for name in ("max_sessions_per_member", "max_msgs_per_s", "max_outbound_bytes", "snapshot_every"):
        if getattr(gw, name) <= 0:
            raise _fail(source, f"gateway.{name}", f"must be positive, got {getattr(gw, name)}")
    for name in ("port", "metrics_port"):  # 0: any free port (tests)
        if not 0 <= getattr(gw, name) <= 65535:
            raise _fail(source, f"gateway.{name}", f"must be in 0..65535, got {getattr(gw, name)}")
    # also bounds how long a closing connection may take its last bytes: finite and positive
    if not 0 < gw.logon_timeout_s <= 3600:
        raise _fail(source, "gateway.logon_timeout_s", f"must be in (0, 3600] seconds, got {gw.logon_timeout_s}")
    if not -20 <= gw.writer_nice <= 19:
        raise _fail(source, "gateway.writer_nice", f"must be in -20..19, got {gw.writer_nice}")
    for name in ("max_connections", "max_pending_logons"):
        if getattr(gw, name) <= 0:
            raise _fail(source, f"gateway.{name}", f"must be positive, got {getattr(gw, name)}")
    if gw.max_pending_logons > gw.max_connections:
        raise _fail(source, "gateway.max_pending_logons",
                    f"must be at most max_connections ({gw.max_connections}), got {gw.max_pending_logons}")
    for name in ("throttle_abuse_factor", "max_pending_per_peer", "logon_failures_per_peer"):
        if getattr(gw, name) < 0:
            raise _fail(source, f"gateway.{name}", f"must be >= 0 (0: off), got {getattr(gw, name)}")
    for name in ("throttle_cooldown_s", "logon_block_s"):
        if not 0 <= getattr(gw, name) <= 86_400:  # also refuses nan
            raise _fail(source, f"gateway.{name}", f"must be in 0..86400 seconds, got {getattr(gw, name)}")
    if (gw.tls_cert is None) != (gw.tls_key is None):
        raise _fail(source, "gateway.tls_cert", "tls_cert and tls_key go together")
    funded = sum(m.role == "member" for m in config.members)
    for name in ("initial_cash", "initial_allowances"):
        if getattr(config, name) < 0:
            raise _fail(source, name, "initial funding cannot be negative")
        if getattr(config, name) * funded > MAX_AMOUNT:
            raise _fail(source, name, f"{funded} members funded with {getattr(config, name)} each is more than "
                                      f"{MAX_AMOUNT} in all")
    return config


def parse_config(text: str | bytes, source: str = "<config>") -> ExchangeConfig:
    """Decode and check a TOML configuration; ``source`` names it in errors."""
    if isinstance(text, bytes):
        text = text.decode()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(raw, ExchangeConfig)
    except msgspec.ValidationError as exc:
        message = str(exc)
        # msgspec says "... - at `$.instruments[0].tick`"; lead with the key.
        what, at, where = message.rpartition(" - at `")
        if at:
            raise _fail(source, where.rstrip("`").removeprefix("$."), what) from None
        raise ConfigError(f"{source}: {message}") from None
    return _check(config, source)


def load_config(path: str | Path) -> ExchangeConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, str(path))


def _demo_toml() -> str:
    lines = [
        "# Kaboni demo exchange: the CEA vintages of the market rules' default configuration",
        "# plus an EU-style instrument, an operator and twenty funded members.",
        "initial_cash = 1_000_000_000        # 10,000,000.00 in minor units, per currency",
        "initial_allowances = 1_000_000      # tonnes of settled allowances per instrument",
        "open_on_start = true",
        "",
        "[market]",
        'fee_account = "EXCHANGE"',
        "",
        "[gateway]",
        'data_dir = "./kaboni-data"',
        "port = 7001",
        "metrics_port = 9101",
        "",
    ]
    refs = {"CEA19-20": 8_500, "CEA21": 8_800, "CEA22": 9_000, "CEA23": 9_100, "CEA24": 9_200, "CEA25": 9_250}
    for symbol, ref in refs.items():
        lines += [
            "[[instruments]]", f'symbol = "{symbol}"', 'currency = "CNY"', f"reference_price = {ref}",
            "tick = 1", "qty_step = 1", "min_qty = 1", "max_qty = 99_999", "band_bp = 1_000", "",
        ]
    lines += [
        "[[instruments]]", 'symbol = "EUA"', 'currency = "EUR"', "reference_price = 7_000",
        "tick = 1", "qty_step = 1_000", "min_qty = 1_000", "max_qty = 10_000_000", "band_bp = 5_000", "",
        "[[members]]", 'id = "ops"', f'token_sha256 = "{hash_token("ops-token")}"', 'role = "operator"', "",
    ]
    for n in range(1, 21):
        member = f"M{n:02d}"
        lines += ["[[members]]", f'id = "{member}"', f'token_sha256 = "{hash_token(member + "-token")}"', ""]
    return "\n".join(lines)


DEMO_TOML = _demo_toml()


def demo_config() -> ExchangeConfig:
    """The embedded demo configuration of ``kaboni serve --demo``."""
    return parse_config(DEMO_TOML, "<demo config>")
