"""Pure offset bookkeeping: a partition's commit position is the end of its fully acknowledged prefix."""

from __future__ import annotations

from collections import deque

TopicPartition = tuple[str, int]


class Slice:
    """The messages of one batch from one partition, and how many of their outputs await acknowledgement."""

    __slots__ = ("tp", "last_offset", "outstanding")

    def __init__(self, tp: TopicPartition, last_offset: int, outstanding: int):
        self.tp = tp
        self.last_offset = last_offset
        self.outstanding = outstanding


class OffsetTracker:
    """Tracks in-flight slices per partition and says which positions are safe to commit."""

    def __init__(self) -> None:
        self._slices: dict[TopicPartition, deque[Slice]] = {}
        self._safe: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._open = 0  # slices in every queue, counted as they come and go (the loop asks on every turn)

    def open(self, tp: TopicPartition, last_offset: int, outstanding: int) -> Slice:
        """Start tracking a batch's messages of one partition; slices must be opened in offset order."""
        queue = self._slices.setdefault(tp, deque())
        if queue and queue[-1].last_offset >= last_offset:
            raise ValueError(f"slice for {tp} at {last_offset} opened out of order")
        s = Slice(tp, last_offset, outstanding)
        queue.append(s)
        self._open += 1
        return s

    def went_back(self, tp: TopicPartition, first_offset: int) -> bool:
        """Whether a batch starting at `first_offset` lies before what was already opened (topic re-created, seek)."""
        queue = self._slices.get(tp)
        opened = queue[-1].last_offset + 1 if queue else -1
        return first_offset < max(opened, self._safe.get(tp, -1))

    def ack(self, s: Slice) -> None:
        """One output of the slice was acknowledged by the broker."""
        s.outstanding -= 1
        if s.outstanding == 0:
            queue = self._slices.get(s.tp)
            while queue and queue[0].outstanding <= 0:
                self._safe[s.tp] = queue.popleft().last_offset + 1
                self._open -= 1

    def to_commit(self, tps: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Positions that advanced since the last call (optionally only for `tps`), marked as committed."""
        out = {
            tp: pos
            for tp, pos in self._safe.items()
            if (tps is None or tp in tps) and self._committed.get(tp, -1) < pos
        }
        self._committed.update(out)
        return out

    def uncommit(self, positions: dict[TopicPartition, int]) -> None:
        """A commit failed; offer these positions again next time."""
        for tp, pos in positions.items():
            if self._committed.get(tp) == pos:
                del self._committed[tp]

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop partitions that this worker no longer owns."""
        for tp in tps:
            self._open -= len(self._slices.pop(tp, ()))
            self._safe.pop(tp, None)
            self._committed.pop(tp, None)

    def in_flight(self) -> int:
        """Slices still waiting for acknowledgements."""
        return self._open

    def safe_positions(self) -> dict[TopicPartition, int]:
        """The current safe commit position of every tracked partition."""
        return dict(self._safe)
