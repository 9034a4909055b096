"""The byte budget that bounds the front end's memory."""

from __future__ import annotations

import asyncio

import pytest

from cluster.admission import ByteBudget


def test_budget_blocks_until_released() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        events: list[str] = []
        await budget.acquire(80)

        async def second() -> None:
            await budget.acquire(50)
            events.append("second acquired")

        task = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        events.append("before release")
        await budget.release(80)
        await task
        assert budget.peak <= 100
        return events

    assert asyncio.run(scenario()) == ["before release", "second acquired"]


def test_amount_larger_than_budget_is_an_error() -> None:
    with pytest.raises(ValueError, match="can never fit"):
        asyncio.run(ByteBudget(10).acquire(11))
