"""A model's demand predicted from what the gateway has seen: its recent rate and the same hours of the day before.

``keep_hot: predicted`` keeps as many of a model's endpoints hot as this forecast needs. A start takes minutes
(a block through the batch queue, then the engine loading), so an endpoint is worth starting only for demand that
lasts: the forecast follows the requests in flight averaged over ``demand_window`` (a burst of a minute barely
moves it; a batch or an afternoon's steady use does), and remembers each hour's highest average, so that the hour
about to begin is expected to be as busy as it was a day earlier and endpoints start ahead of it. When both fall,
the endpoints beyond the need get no more requests and release their blocks after their ``max_idletime``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S


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
