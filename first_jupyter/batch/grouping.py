"""A batch's lines reordered within a bounded look-ahead, so that lines sharing an opening are issued together.

An engine's prefix cache holds the openings it saw last; a batch whose lines interleave a few system prompts, sent
in file order, makes every engine see all of them at once and evicts each before it is used again. Sent a group at
a time, the router keeps the group on the endpoint that holds its prefix (``Router.candidates``) and that engine
answers all but the first from its cache. The output does not change: results are written as they end, whatever
order the lines went in, and a resumed run skips the custom_ids the result files hold, not a count of lines.

Memory stays bounded: at most ``depth`` lines are held ahead of what was issued. Order is bent, not dropped: when a
group is used up, the group of the oldest line held comes next, and a line read ``depth`` lines before the one
being issued goes next whatever group is being issued, so no line waits behind more than about two look-aheads of
others (a large group does not starve the rest).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

from first_jupyter.gateway.router import prefix_of

_T = TypeVar("_T")

LOOKAHEAD_WINDOWS = 4
"""A batch run's look-ahead, in windows of lines in flight (``defaults.batch.max_in_flight``): a few windows let a
group fill the window, at a bounded cost in memory."""


Line = dict[str, Any]
"""A batch input line: custom_id, method, url, body."""


def opening(item: Line) -> Hashable:
    """What a batch line is grouped by: the first block of its opening, as the router hashes it (``prefix_of``),
    which is what an engine's prefix cache and the router's affinity start from; a line with none is a group of its
    own (its custom_id)."""
    body = item["body"]
    prefix = prefix_of(body["model"], body, most=1)
    return prefix[0] if prefix else alone(item)


def alone(item: Line) -> Hashable:
    """Each line a group of its own: file order (``defaults.prefix_routing.enabled`` off turns every prefix
    affinity off, a batch's grouping too)."""
    custom_id: str = item["custom_id"]
    return custom_id


def grouping(enabled: bool) -> Callable[[Line], Hashable]:
    """The key batch lines are grouped by, under ``defaults.prefix_routing.enabled``."""
    return opening if enabled else alone


def grouped(items: Iterable[_T], key: Callable[[_T], Hashable], depth: int) -> Iterator[_T]:
    """``items``, each once, the ones of equal ``key`` together as far as ``depth`` lines of look-ahead allow."""
    source = iter(items)
    groups: dict[Hashable, deque[tuple[int, _T]]] = {}
    arrivals: deque[tuple[int, Hashable]] = deque()
    """(read number, key) of the lines held, in the order read; those issued already are dropped lazily."""
    read = issued = 0
    current: Hashable = None
    while True:
        for item in islice(source, depth - (read - issued)):
            line_key = key(item)
            groups.setdefault(line_key, deque()).append((read, item))
            arrivals.append((read, line_key))
            read += 1
        while arrivals and _issued(groups, *arrivals[0]):
            arrivals.popleft()
        if not arrivals:
            return
        oldest, oldest_key = arrivals[0]
        if current not in groups or issued - oldest >= depth:
            current = oldest_key
        group = groups[current]
        issued += 1
        yield group.popleft()[1]
        if not group:
            del groups[current]


def _issued(groups: dict[Hashable, deque[tuple[int, _T]]], number: int, line_key: Hashable) -> bool:
    """Whether the line read as ``number`` was issued: its group issues in the order read, so it was unless it is
    still at or behind the group's head."""
    group = groups.get(line_key)
    return group is None or group[0][0] > number
