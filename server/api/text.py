"""Token ids -> the text a client sees: streaming detokenisation and stop strings, in one place."""

from __future__ import annotations

from parcae_serve.model.tokenizer import IncrementalDecoder, Tokenizer


class ChoiceText:
    """Accumulates one choice's text. Text that might be the start of a stop string is held
    back until it is known not to be, so a stop string never leaks, even split across tokens."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.text = ""  # released to the client
        self.pending = ""  # held back
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly released text ('' if none yet)."""
        if self.stopped:
            return ""
        return self._release(self.decoder.push(token_id))

    def finish(self) -> str:
        """End of generation: release whatever is held (a stop string can no longer complete)."""
        if self.stopped:
            return ""
        tail = self.pending + self.decoder.flush()
        self.pending = ""
        cut = self._find_stop(tail)
        if cut is not None:
            tail, self.stopped = tail[:cut], True
        self.text += tail
        return tail

    def _release(self, delta: str) -> str:
        buf = self.pending + delta
        cut = self._find_stop(buf)
        if cut is not None:
            out, self.pending, self.stopped = buf[:cut], "", True
        else:
            hold = self._held_suffix(buf)
            out, self.pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out

    def _find_stop(self, buf: str) -> int | None:
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if stop.startswith(buf[-k:]):
                    best = k
                    break
        return best
