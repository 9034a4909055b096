"""Admission control: size limits and the byte budget that pushes back on fast senders.

The front end reads a client's stream only after reserving room for the chunk in a
process-wide byte budget; while the budget is spent, it stops reading, gRPC's HTTP/2 flow
control window fills, and the client's sends block. Memory in the front end therefore stays
below ``max_inflight_bytes`` whatever the clients do.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    """A counting semaphore over bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._peak = 0
        self._changed = asyncio.Condition()

    async def acquire(self, amount: int) -> None:
        """Wait until ``amount`` bytes fit in the budget, then take them."""
        if amount > self._limit:
            raise ValueError(f"{amount} bytes can never fit a budget of {self._limit}")
        async with self._changed:
            await self._changed.wait_for(lambda: self._used + amount <= self._limit)
            self._used += amount
            self._peak = max(self._peak, self._used)

    async def release(self, amount: int) -> None:
        """Give ``amount`` bytes back."""
        async with self._changed:
            self._used -= amount
            self._changed.notify_all()

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        """The most bytes ever held at once (exposed for tests and metrics)."""
        return self._peak
