"""Stop strings, matched as text is decoded: what of a growing completion may be shown yet."""

from __future__ import annotations

from collections.abc import Sequence


class StopFilter:
    """What of a growing completion may be shown yet: text is released only once it cannot be
    the start of a stop string nor an incomplete UTF-8 sequence, so a stream never shows what
    the final text will not contain (and equals the non-streamed text piece by piece).

    Incremental: each call reads only the characters decoded since the previous one, through one
    Knuth-Morris-Pratt matcher per stop string, so a token costs O(new characters x stop strings)
    whatever the stop strings' lengths (building the matchers once costs their total length)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(x for x in stop if x)
        self.matchers = [_StopMatcher(x) for x in self.stop]
        self.sent = 0  # characters released
        self.scanned = 0  # characters of the completion the matchers have read
        self.stopped = False
        self.word = ""  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """The new piece to show, given the whole completion so far."""
        if self.stopped:
            return ""
        safe = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence is not text yet
        cut = self._scan(safe)
        if cut is not None:
            self.stopped = True
            return self._send(safe[:cut])
        hold = max((m.state for m in self.matchers), default=0)  # the longest tail that may start a stop string
        return self._send(safe[: len(safe) - hold])

    def flush(self, text: str) -> str:
        """The completion ended: everything not yet shown (a held-back partial stop string too)."""
        return self._send(text.rstrip("\ufffd"))

    def _scan(self, safe: str) -> int | None:
        """Read the characters not read yet; where the earliest stop string they complete starts, or None."""
        if len(safe) < self.scanned:  # the decoded text got shorter (never with byte-level BPE): read it again
            self.scanned = 0
            for m in self.matchers:
                m.state = 0
        cut: int | None = None
        for i in range(self.scanned, len(safe)):
            for m in self.matchers:
                if m.step(safe[i]):
                    start = i + 1 - len(m.stop)
                    if cut is None or start < cut:
                        cut, self.word = start, m.stop
        self.scanned = len(safe)
        return cut

    def _send(self, text: str) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece


class _StopMatcher:
    """Knuth-Morris-Pratt over one stop string: `state` is the length of the longest tail of the
    text read so far that is a prefix of the stop string (amortised O(1) per character read)."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.fail = _prefix_function(stop)
        self.state = 0

    def step(self, char: str) -> bool:
        """Read one character; True when it completes the stop string."""
        k = self.state
        while k and self.stop[k] != char:
            k = self.fail[k - 1]
        if self.stop[k] == char:
            k += 1
        if k == len(self.stop):
            self.state = self.fail[k - 1]
            return True
        self.state = k
        return False


def _prefix_function(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail
