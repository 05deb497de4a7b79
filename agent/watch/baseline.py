"""One sensor's learned behaviour, and the findings when a message breaks it. Pure.

Constant work per message and a few hundred bytes per sensor:

- Interval: a running mean and mean absolute deviation of log(interval)
  (multiplicative jitter is additive there). A message's score is its
  deviation in units of the learned one (at least 5 %). An interval near 2, 3
  or 4 times the learned one is lost messages, not an anomaly (radios drop
  packets). Scores beyond 4 add up over consecutive messages (a CUSUM, each
  adding at most 6); a normal interval clears the sum. A finding when it
  passes the threshold: two unusual intervals in a row with the default of 8,
  never a single one, nor a lost message. Faster than `burst` times the
  learned rate is a burst; otherwise a new cadence.
- Payload size: the same, on the size itself (deviation at least 2 bytes or
  5 %).
- What it does: the (method, rule) pairs used while learning, as small
  hashes; another one later is a finding.
- Hours: a 24-bit mask of the UTC hours it was active in while learning (if
  learning lasted a day); a message in another hour is a finding.
- Refusals: failed authentications naming it and policy denials, each as a
  count decaying over 10 minutes.
- Addresses: the address it speaks from and the one before; a message from
  the one before, within two learned intervals (a minute at least) of the
  switch, means two devices hold the credential. A move (NAT rebinding, a new
  route) is one switch and is not reported.

While learning the estimates follow every sample; after it they still
follow, slowly and with each sample clipped to 3 deviations, so that a
sensor's slow drift is absorbed while an attack is not learned as normal.
"""

from __future__ import annotations

import math

from agent.policy.model import WatchSection
from agent.watch import findings as kinds
from agent.watch.findings import Finding

ALLOWANCE = 4.0  # deviations each unusual sample may have before it counts as evidence
CLEAR = 2.0  # a sample within this many deviations clears the evidence summed so far
MAX_EVIDENCE = 10.0  # one sample's contribution at most: one wild sample is not enough
SLOW = 0.02  # the estimates' weight of a new sample after learning
LOSS_TOLERANCE = 0.15  # an interval within 15 % of 2, 3 or 4 times the learned one: lost
INTERVAL_FLOOR, SIZE_FLOOR = 0.05, 0.05
REFUSAL_WINDOW = 600.0  # seconds over which refusal counts decay
SWITCH_WINDOW = 60.0  # at least: a switch back within two intervals is "at once"
MAX_ACTIONS = 32
DAY = 86400.0
_LOG2, _LOG3, _LOG4 = math.log(2), math.log(3), math.log(4)
_LOST_FROM = _LOG2 - LOSS_TOLERANCE


def _hash(text: str) -> int:
    # Python's own string hash: fast, and baselines live in memory only (it differs
    # between processes). Never 0, which means "none yet".
    return hash(text) & 0xFFFFFFFF or 1


class Baseline:
    __slots__ = ("actions", "addr", "addr_prev", "auth", "auth_at", "denied", "denied_at",
                 "first", "hours", "i_dev", "i_mean", "i_sum", "last", "n", "profile",
                 "s_dev", "s_mean", "s_sum", "switch_at")

    def __init__(self, now: float, profile: str = "") -> None:
        self.profile = profile  # whose settings apply (the profile names are shared)
        self.n = 0
        self.first = self.last = now
        self.i_mean = self.i_dev = self.i_sum = 0.0
        self.s_mean = self.s_dev = self.s_sum = 0.0
        self.actions: tuple[int, ...] = ()
        self.hours = 0
        self.auth = self.denied = 0.0
        self.auth_at = self.denied_at = now
        self.addr = self.addr_prev = 0
        self.switch_at = 0.0

    def learned(self, settings: WatchSection, now: float) -> bool:
        return self.n >= settings.min_messages and now - self.first >= settings.learning

    def active_since(self, now: float) -> float:
        """When the current run of hours it is active in began (the learned hours);
        -inf when it is active around the clock, +inf when not in this hour."""
        if not self.hours or self.hours == (1 << 24) - 1:
            return float("-inf")
        hour_start = now - now % 3600
        hour = int(now // 3600 % 24)
        if not self.hours >> hour & 1:
            return float("inf")
        back = 0
        while back < 24 and self.hours >> ((hour - back - 1) % 24) & 1:
            back += 1
        return hour_start - back * 3600

    @property
    def interval(self) -> float:
        """The learned interval in seconds (0 before two messages)."""
        return math.exp(self.i_mean) if self.n >= 2 else 0.0

    # --- a message -----------------------------------------------------------------------

    def message(self, now: float, size: int, action: str, address: str,
                settings: WatchSection) -> Finding | None:
        """Takes in one authenticated message; the finding it makes, if any (the most
        telling one: two addresses, a new action, an unusual hour, interval or burst,
        payload size)."""
        learned = self.learned(settings, now)
        # Each estimate takes the message in; the most telling finding is reported.
        timing = self._interval(now, max(now - self.last, 1e-3), learned, settings) \
            if self.n >= 1 else None
        size_found = self._size(now, size, learned, settings)
        hour = self._hour(now, learned, settings)
        new_action = self._action(action, learned, now)
        addresses = self._addresses(now, address, learned)
        self.n += 1
        self.last = now
        return addresses or new_action or hour or timing or size_found

    def _interval(self, now: float, interval: float, learned: bool,
                  settings: WatchSection) -> Finding | None:
        x = math.log(interval)
        if self.n == 1:  # the first interval
            self.i_mean, self.i_dev = x, 0.0
            return None
        delta = x - self.i_mean
        deviation = abs(delta) / (self.i_dev if self.i_dev > INTERVAL_FLOOR else
                                  INTERVAL_FLOOR)
        lost = delta > _LOST_FROM and (abs(delta - _LOG2) < LOSS_TOLERANCE or
                                       abs(delta - _LOG3) < LOSS_TOLERANCE or
                                       abs(delta - _LOG4) < LOSS_TOLERANCE)
        found = None
        if learned and not lost:
            evidence = self._evidence("i_sum", deviation, settings.interval_score)
            if evidence is not None:
                expected = math.exp(self.i_mean)
                # Faster than `burst` times the learned rate: a burst; else a new cadence.
                burst = x < self.i_mean - math.log(settings.burst)
                found = Finding(
                    kinds.BURST if burst else kinds.INTERVAL, evidence.score,
                    f"{interval:.3g} s since the last message" +
                    (f", over {settings.burst} times the learned rate" if burst else ""),
                    f"one every {expected:.3g} s (±{self.i_dev * 100:.0f} %)", now)
        if not lost:
            self._learn_interval(x, learned)
        return found

    def _learn_interval(self, x: float, learned: bool) -> None:
        weight = SLOW if learned else max(1.0 / self.n, SLOW)
        if learned:  # clipped: an attack is not learned as normal in one step
            limit = 3 * max(self.i_dev, INTERVAL_FLOOR)
            x = min(max(x, self.i_mean - limit), self.i_mean + limit)
        delta = x - self.i_mean
        self.i_mean += weight * delta
        self.i_dev += weight * (abs(delta) - self.i_dev)

    def _size(self, now: float, size: int, learned: bool,
              settings: WatchSection) -> Finding | None:
        if self.n == 0:
            self.s_mean, self.s_dev = float(size), 0.0
            return None
        floor = max(2.0, SIZE_FLOOR * self.s_mean)
        deviation = abs(size - self.s_mean) / max(self.s_dev, floor)
        found = None
        if learned:
            evidence = self._evidence("s_sum", deviation, settings.size_score)
            if evidence is not None:
                found = Finding(kinds.SIZE, evidence.score, f"{size} bytes",
                                f"{self.s_mean:.0f} bytes (±{max(self.s_dev, floor):.0f})",
                                now)
        weight = SLOW if learned else max(1.0 / (self.n + 1), SLOW)
        value = float(size)
        if learned:
            limit = 3 * max(self.s_dev, floor)
            value = min(max(value, self.s_mean - limit), self.s_mean + limit)
        delta = value - self.s_mean
        self.s_mean += weight * delta
        self.s_dev += weight * (abs(delta) - self.s_dev)
        return found

    def _evidence(self, slot: str, deviation: float, threshold: float) -> Finding | None:
        """CUSUM over one estimate's deviations; a placeholder finding with the score
        when the sum passes `threshold` (the caller fills in what it means)."""
        if deviation < CLEAR:
            setattr(self, slot, 0.0)
            return None
        total = max(0.0, getattr(self, slot) + min(deviation, MAX_EVIDENCE) - ALLOWANCE)
        if total >= threshold:
            setattr(self, slot, 0.0)
            return Finding("", total, "", "", 0.0)
        setattr(self, slot, total)
        return None

    def _action(self, action: str, learned: bool, now: float) -> Finding | None:
        mark = _hash(action)
        if mark in self.actions:
            return None
        if not learned:
            if len(self.actions) < MAX_ACTIONS:
                self.actions += (mark,)
            return None
        self.actions += (mark,) if len(self.actions) < MAX_ACTIONS else ()
        return Finding(kinds.NEW_PATH, 10.0, f"{action[:80]}",
                       f"the {len(self.actions) - 1} it used while learning", now)

    def _hour(self, now: float, learned: bool, settings: WatchSection) -> Finding | None:
        bit = 1 << int(now // 3600 % 24)
        if not learned:
            self.hours |= bit
            return None
        if not settings.hours or settings.learning < DAY or self.hours & bit:
            return None
        self.hours |= bit  # reported once per hour of the day
        active = [h for h in range(24) if self.hours >> h & 1 and 1 << h != bit]
        return Finding(kinds.HOURS, 10.0, f"active at {int(now // 3600 % 24):02d}:00 UTC",
                       f"active in {_hour_ranges(active)} UTC", now)

    def _addresses(self, now: float, address: str, learned: bool) -> Finding | None:
        mark = _hash(address)
        if mark == self.addr:
            return None
        window = max(SWITCH_WINDOW, 2 * self.interval)
        back = bool(self.addr) and mark == self.addr_prev and now - self.switch_at < window
        self.addr, self.addr_prev, self.switch_at = mark, self.addr, now
        if learned and back:  # back to the address it left moments ago: two at once
            return Finding(kinds.TWO_ADDRESSES, 10.0, f"messages from {address[:60]} "
                           f"again within {window:.0f} s of one from another address",
                           "one address at a time (a new one now and then)", now)
        return None

    # --- refusals ------------------------------------------------------------------------

    def refused(self, now: float, auth: bool, settings: WatchSection) -> Finding | None:
        """A failed authentication naming the sensor (`auth`) or a policy denial."""
        slot, threshold = ("auth", settings.auth_failures) if auth else \
            ("denied", settings.denials)
        at = getattr(self, slot + "_at")
        count = getattr(self, slot) * math.exp(-(now - at) / REFUSAL_WINDOW) + 1.0
        setattr(self, slot + "_at", now)
        if count >= threshold:
            setattr(self, slot, 0.0)  # reported once per burst
            kind = kinds.AUTH_FAILURES if auth else kinds.DENIALS
            what = "failed authentications naming it" if auth else "policy denials"
            return Finding(kind, count, f"{count:.0f} {what} within about 10 minutes",
                           f"fewer than {threshold}", now)
        setattr(self, slot, count)
        return None


def _hour_ranges(hours: list[int]) -> str:
    if not hours:
        return "no hour"
    ranges, start = [], hours[0]
    for previous, hour in zip(hours, [*hours[1:], None], strict=True):
        if hour != previous + 1:
            ranges.append(f"{start:02d}-{previous + 1:02d}h")
            start = hour if hour is not None else start
    return ", ".join(ranges)
