"""Stop strings cost a token the same whatever their length, and the same late in a completion as early.

The matcher alone (`sc2quant.runtime.StopFilter`, fed as generation feeds it: the whole completion so
far after every token), timed as a ratio between a small and a large case of the same test, never
against an absolute slack (a server test with 64 tokens and 0.5 s of slack could not see the first
matcher come back). An incremental matcher costs the large case about 1x the small one (stop strings
100x longer) or 10x (10x the tokens); the first matcher (a whole-text search and every prefix of
every stop string compared each token) more than 20x in both, and one that reads the completion
again each token more than 30x in the second. A large case stops once it is clearly too slow.
"""

from __future__ import annotations

import time

from sc2quant.runtime import StopFilter

TOKEN = "ab" * 10  # 20 characters a token; every character extends a partial match of the stop strings below
ENDINGS = "cdefghijklmnopqr"  # never in the text: the stop strings never match whole, every token is fed


def _stops(length: int, count: int) -> list[str]:
    """`count` stop strings of `length` characters, each "abab...a" and an ending the text never has."""
    return [("ab" * length)[: length - 1] + end for end in ENDINGS[:count]]


def _feed_seconds(stop: list[str], tokens: int, give_up: float = float("inf")) -> float:
    """Best of 5 runs: seconds to feed `tokens` tokens to a fresh filter (the filter built before the clock
    starts); a run past `give_up` seconds ends there and counts as infinitely slow."""
    best = float("inf")
    for _ in range(5):
        stop_filter, text, shown = StopFilter(stop), "", 0
        t0 = time.perf_counter()
        for _ in range(tokens):
            text += TOKEN
            shown += len(stop_filter.feed(text))
            if time.perf_counter() - t0 > give_up:
                return float("inf")
        best = min(best, time.perf_counter() - t0)
        assert not stop_filter.stopped and shown + len(stop_filter.flush(text)) == len(text)  # held back, never lost
    return best


def _times(large: float, small: float, give_up: float) -> str:
    if large == float("inf"):
        return f"more than {give_up:g}x ({small * 1e3:.1f} ms for the small case; the large one was given up)"
    return f"{large / small:.1f}x ({large * 1e3:.1f} ms against {small * 1e3:.1f} ms)"


def test_a_token_costs_the_same_whatever_the_stop_strings_length():
    """16 stop strings of 1,000 characters (the server's limits) against 16 of 10, 300 tokens each."""
    short = _feed_seconds(_stops(10, 16), 300)
    longest = _feed_seconds(_stops(1000, 16), 300, give_up=20 * short)
    assert longest < 3 * short, (f"stop strings 100x longer made the same tokens cost {_times(longest, short, 20)}: "
                                 "a token's cost grows with the stop strings' length")


def test_a_token_costs_the_same_late_in_a_long_completion():
    """2,000 tokens (40,000 characters) cost 10x what 200 do, not 100x: no token reads the completion again."""
    stop = _stops(10, 16)
    short = _feed_seconds(stop, 200)
    long = _feed_seconds(stop, 2000, give_up=30 * short)
    assert long < 25 * short, (f"10x the tokens cost {_times(long, short, 30)}: a token's cost grows with the "
                               "completion's length")
