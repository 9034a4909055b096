"""Admission control: size limits and the byte budget that pushes back on fast senders.

The front end reads a client's stream only after reserving room for the chunk in a
process-wide byte budget; while the budget is spent, it stops reading, gRPC's HTTP/2 flow
control window fills, and the client's sends block. Memory in the front end therefore stays
below ``max_inflight_bytes`` whatever the clients do.

Partial files could deadlock a plain byte semaphore: three senders each half-way through a
large file, the budget spent, each waiting for room the others hold. So the oldest file
still arriving (the head) may always take room, and every other file leaves enough free
for the head to reach ``max_file_bytes``; finished files give their bytes back once
committed, so the head always completes and the next oldest becomes the head.

Among the others, the budget is shared fairly: each client (one stream) is entitled to an
equal share of it among the clients that hold or want bytes. A client above its share gets
more only while no client below its share is waiting, so one fast sender of large files
cannot starve a modality sending small ones, yet a lone client still gets the whole budget.
A sender that stops sending mid-file is timed out by the front end, which gives its bytes
back.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Hashable

_SHARED = "shared"


class ByteBudget:
    """A counting semaphore over bytes, with a fair share per owner."""

    def __init__(self, limit: int, max_file: int | None = None) -> None:
        self._limit = limit
        self._max_file = max_file
        # Files still arriving, oldest first, with the bytes each holds.
        self._open: dict[Hashable, int] = {}
        self._used = 0
        self._peak = 0
        self._held: Counter[Hashable] = Counter()
        self._waiting: Counter[Hashable] = Counter()
        self._changed = asyncio.Condition()

    async def acquire(
        self, amount: int, owner: Hashable = _SHARED, file: Hashable | None = None
    ) -> None:
        """Wait until ``amount`` bytes fit in the budget and ``owner``'s share, then take them
        (for ``file``, a file still arriving; see ``close_file``)."""
        if amount > self._limit:
            raise ValueError(f"{amount} bytes can never fit a budget of {self._limit}")
        async with self._changed:
            if file is not None:
                self._open.setdefault(file, 0)
            self._waiting[owner] += 1
            try:
                await self._changed.wait_for(lambda: self._may_take(owner, amount, file))
            finally:
                self._waiting[owner] -= 1
                if not self._waiting[owner]:
                    del self._waiting[owner]
                # Another waiter may have been held back only by this one waiting.
                self._changed.notify_all()
            self._used += amount
            self._held[owner] += amount
            if file is not None:
                self._open[file] += amount
            self._peak = max(self._peak, self._used)

    async def close_file(self, file: Hashable) -> None:
        """``file`` has stopped arriving (complete, refused or abandoned): it is no longer
        the head nor one that must leave room for it. Its bytes stay held until released."""
        async with self._changed:
            self._open.pop(file, None)
            self._changed.notify_all()

    async def release(self, amount: int, owner: Hashable = _SHARED) -> None:
        """Give ``amount`` bytes of ``owner``'s back."""
        async with self._changed:
            self._used -= amount
            self._held[owner] -= amount
            if self._held[owner] <= 0:
                del self._held[owner]
            self._changed.notify_all()

    def share(self) -> int:
        """What each client is entitled to now: the budget over the clients active."""
        active = {owner for owner, held in self._held.items() if held > 0} | set(self._waiting)
        return self._limit // max(1, len(active))

    def _may_take(self, owner: Hashable, amount: int, file: Hashable | None) -> bool:
        if self._used + amount > self._limit:
            return False
        head = next(iter(self._open), None)
        if file is not None and file == head:
            return True  # the oldest file arriving always goes on (see the module)
        if head is not None and self._max_file is not None:
            head_may_need = max(0, self._max_file - self._open[head])
            if self._used + amount + head_may_need > self._limit:
                return False
        share = self.share()
        if self._held[owner] + amount <= share:
            return True
        # Above its share: only if no other client below its share is waiting.
        return not any(other != owner and self._held[other] < share for other in self._waiting)

    def held(self, owner: Hashable = _SHARED) -> int:
        """Bytes ``owner`` holds now."""
        return self._held[owner]

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        """The most bytes ever held at once (exposed for tests and metrics)."""
        return self._peak
