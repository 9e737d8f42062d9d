"""A model's demand predicted from what the gateway has seen: its recent rate and the same hours of the day before.

``keep_hot: predicted`` keeps as many of a model's endpoints hot as this forecast needs. A start takes minutes
(a block through the batch queue, then the engine loading), so an endpoint is worth starting only for demand that
lasts: the forecast follows the requests in flight averaged over ``demand_window`` (a burst of a minute barely
moves it; a batch or an afternoon's steady use does), and remembers each hour's highest average, so that the hour
about to begin is expected to be as busy as it was a day earlier and endpoints start ahead of it. When both fall,
the endpoints beyond the need get no more requests and release their blocks after their ``max_idletime``.

A burst (a script's few hundred requests within a minute) is over long before a start it triggers answers, so only
capacity hot before it comes helps. The forecast also keeps the most requests in flight at once in each of the
last 24 hours: a peak that came back in several hours around this time of day (``burst``: the last hours, and the
hours ahead a day earlier) is expected again, and planned for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
BURST_SPAN_H = 8
"""The hours whose peaks foretell the next: the last ones, and as many ahead a day earlier (bursts follow the
working day: yesterday's afternoon says more of this afternoon than last night does)."""


@dataclass(slots=True)
class Forecast:
    """One model's requests in flight, averaged over ``window_s`` (exponentially, in time), and the highest
    average of each hour of the day, today's and the day before's."""

    window_s: float
    day_offset_s: float
    """Added to the router's clock to give seconds since a midnight (so its hours are the day's)."""
    in_flight: int = 0
    level: float = 0.0
    at: float = -math.inf
    today: list[float] = field(default_factory=lambda: [0.0] * 24)
    before: list[float] = field(default_factory=lambda: [0.0] * 24)
    day: list[int] = field(default_factory=lambda: [-2] * 24)
    """The day each hour of ``today`` was last written in."""
    peaks: list[int] = field(default_factory=lambda: [0] * 24)
    """The most requests in flight at once in each of the last 24 hours, by ``peak_hour`` (a ring)."""
    peak_hour: list[int] = field(default_factory=lambda: [-48] * 24)
    """The hour (since the clock's midnight) each of ``peaks`` belongs to."""

    def _advance(self, now: float) -> None:
        if now > self.at:
            decay = math.exp(-(now - self.at) / self.window_s) if self.at > -math.inf else 0.0
            self.level = self.in_flight + (self.level - self.in_flight) * decay
            self.at = now
        day, hour = divmod(int((now + self.day_offset_s) // HOUR_S), 24)
        if self.day[hour] != day:  # the hour comes round again: what it saw a day ago is the day before's
            self.before[hour] = self.today[hour] if self.day[hour] == day - 1 else 0.0
            self.today[hour], self.day[hour] = 0.0, day
        self.today[hour] = max(self.today[hour], self.level)

    def rose(self, now: float) -> None:
        self._advance(now)
        self.in_flight += 1
        hour = self._hour(now)
        ring = hour % 24
        if self.peak_hour[ring] != hour:  # the ring comes round: the hour 24 h ago gives way
            self.peak_hour[ring], self.peaks[ring] = hour, 0
        self.peaks[ring] = max(self.peaks[ring], self.in_flight)

    def fell(self, now: float) -> None:
        self._advance(now)
        self.in_flight -= 1

    def predicted(self, now: float, ahead_s: float) -> float:
        """The requests in flight to plan for until ``ahead_s`` from now: the recent average, or what this hour
        and the one ``ahead_s`` away saw the day before, whichever is more."""
        self._advance(now)
        return max(self.level, self._day_before(now), self._day_before(now + ahead_s))

    def _day_before(self, at: float) -> float:
        """The highest average the hour of ``at`` saw a day earlier (0 when that day is not known)."""
        day, hour = divmod(int((at + self.day_offset_s) // HOUR_S), 24)
        if self.day[hour] == day - 1:  # not yet come round today
            return self.today[hour]
        return self.before[hour] if self.day[hour] == day else 0.0

    def burst(self, now: float, hours: int) -> int:
        """The requests in flight at once to be ready for: the ``hours``-th highest hourly peak among the last
        ``BURST_SPAN_H`` hours and the ``BURST_SPAN_H`` ahead a day earlier (0 while fewer hours had any). A burst
        seen once is chance; one that came back in ``hours`` of those hours is this model's habit at this time of
        day."""
        hour = self._hour(now)
        around = sorted((peak for peak, at in zip(self.peaks, self.peak_hour, strict=True)
                         if hour - BURST_SPAN_H < at <= hour or hour - 24 < at <= hour - 24 + BURST_SPAN_H),
                        reverse=True)
        return around[hours - 1] if len(around) >= hours else 0

    def _hour(self, at: float) -> int:
        return int((at + self.day_offset_s) // HOUR_S)
