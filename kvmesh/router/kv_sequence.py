"""Sequence bookkeeping of one worker's KV-event stream (pure: no grpc, no index).

vLLM numbers the KV-event batches of each data-parallel rank (its ZMQ publisher's
sequence), and the VllmEngine servicer relays them with that number; a ``load_only``
batch (the servicer's heartbeat, about once a second while the engine is idle)
repeats the last number it sent. From those numbers alone the router tells what
happened to the stream since the last batch it applied:

========================  ==============================  =============================
what arrives              reading                         verdict
========================  ==============================  =============================
``seq == cursor + 1``     the next batch                  apply
``seq == cursor``         a duplicate                     skip
``seq > cursor + 1``      batches were dropped            reset, then apply this one
``seq < cursor``          reordered, replayed, or the     reset, skip this one
                          publisher restarted its count
heartbeat ``> cursor``    the batches before it were      reset (nothing to apply)
                          dropped (a lost tail)
heartbeat ``< cursor``    the publisher restarted         reset
snapshot chunk ``0``      the relay's full state          replace the view with it
========================  ==============================  =============================

A *reset* drops everything the index holds for the worker and relearns it from the
batches that follow (and from a snapshot when the servicer sends one): the index may
then miss blocks the worker holds (a cache miss routed as such, never an error) but
never claims one it dropped. Applying a batch right after a gap is safe for the same
reason: its stores are held as of its number and its removals of unknown blocks are
no-ops. A batch older than the cursor is skipped, never applied: it could re-store a
block a later batch removed. So a fault costs at most the time until the next message
on that rank (a batch, or the heartbeat within ~1 s): that is the repair window.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Verdict:
    """What to do with one batch: apply its events or not, after a reset or not."""

    apply: bool
    #: Why the worker's view must be dropped first (None: keep it).
    reset: str | None = None
    #: A gap (dropped batches) rather than a reordering or restart: counted apart.
    gap: bool = False
    #: A snapshot's first chunk: the view is replaced (expected, not a fault).
    replace: bool = False


APPLY = Verdict(apply=True)
SKIP = Verdict(apply=False)


@dataclass
class SequenceCursors:
    """The last sequence number seen per data-parallel rank of one worker."""

    cursors: dict[int, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.cursors.clear()

    def resume_from(self) -> int:
        """Where a resubscription starts: after the cursor of a single-rank stream;
        0 (live, after a reset) when there is no cursor or several ranks share the
        stream (one start number cannot fit them all)."""
        if len(self.cursors) != 1:
            return 0
        return next(iter(self.cursors.values())) + 1

    def admit(self, rank: int, seq: int, *, load_only: bool = False,
              snapshot_chunk: int | None = None) -> Verdict:
        last = self.cursors.get(rank)
        if load_only:
            return self._heartbeat(rank, seq, last)
        if snapshot_chunk is not None:
            self.cursors[rank] = seq
            return Verdict(apply=True, replace=snapshot_chunk == 0)
        self.cursors[rank] = seq
        if last is None or seq == last + 1:
            return APPLY
        if seq == last:
            return SKIP
        if seq > last + 1:
            return Verdict(apply=True, reset=f"gap on rank {rank} ({last} -> {seq})",
                           gap=True)
        return Verdict(apply=False, reset=f"rank {rank} went back ({last} -> {seq}): "
                       "reordered, replayed, or the publisher restarted")

    def _heartbeat(self, rank: int, seq: int, last: int | None) -> Verdict:
        # Numbered 0: sent before the publisher's first batch (no cursor to check).
        if seq == 0 or last is None or seq == last:
            return SKIP
        self.cursors[rank] = seq
        if seq > last:
            return Verdict(apply=False, reset=f"heartbeat on rank {rank} at {seq} after "
                           f"{last}: the batches between were lost", gap=True)
        return Verdict(apply=False, reset=f"heartbeat on rank {rank} went back "
                       f"({last} -> {seq}): the publisher restarted")
