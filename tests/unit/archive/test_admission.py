"""The byte budget that bounds the front end's memory."""

from __future__ import annotations

import asyncio

import pytest

from cluster.archive.admission import ByteBudget


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


def test_a_lone_client_may_use_the_whole_budget() -> None:
    async def scenario() -> int:
        budget = ByteBudget(100)
        for _ in range(10):
            await asyncio.wait_for(budget.acquire(10, "a"), 1)
        return budget.held("a")

    assert asyncio.run(scenario()) == 100


def test_a_client_below_its_share_goes_before_one_above_it() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []
        await budget.acquire(90, "big")  # alone: may take more than half

        async def take(owner: str, amount: int) -> None:
            await budget.acquire(amount, owner)
            order.append(owner)

        big_more = asyncio.create_task(take("big", 10))
        await asyncio.sleep(0.01)
        assert order == ["big"]  # 90 + 10 fit, and nobody else waited
        small = asyncio.create_task(take("small", 10))
        await asyncio.sleep(0.01)
        assert order == ["big"]  # the budget is full: small waits
        bigger = asyncio.create_task(take("big", 10))
        await asyncio.sleep(0.01)
        await budget.release(20, "big")  # room for one more 10 or two
        await asyncio.wait_for(asyncio.gather(small, bigger), 1)
        await big_more
        return order

    # "small" (below its share of 50) is served before "big" (above it) takes more.
    assert asyncio.run(scenario()) == ["big", "small", "big"]


def test_a_client_above_its_share_waits_while_another_below_it_waits() -> None:
    async def scenario() -> tuple[bool, int]:
        budget = ByteBudget(100)
        await budget.acquire(60, "a")
        await budget.acquire(30, "b")
        # b wants 20: does not fit (90 + 20 > 100). a's further 5 would fit, but a is above
        # its share (50) while b, below it, waits: a must wait too.
        b_more = asyncio.create_task(budget.acquire(20, "b"))
        await asyncio.sleep(0.01)
        a_more = asyncio.create_task(budget.acquire(5, "a"))
        await asyncio.sleep(0.05)
        a_waited = not a_more.done()
        await budget.release(60, "a")
        await asyncio.wait_for(asyncio.gather(b_more, a_more), 1)
        return a_waited, budget.held("b")

    assert asyncio.run(scenario()) == (True, 50)


def test_share_is_the_budget_over_the_active_clients() -> None:
    async def scenario() -> list[int]:
        budget = ByteBudget(90)
        shares = [budget.share()]
        await budget.acquire(10, "a")
        shares.append(budget.share())
        await budget.acquire(10, "b")
        await budget.acquire(10, "c")
        shares.append(budget.share())
        await budget.release(10, "c")
        shares.append(budget.share())
        return shares

    assert asyncio.run(scenario()) == [90, 90, 30, 45]


def test_partial_files_cannot_deadlock_the_budget() -> None:
    """Three files arriving at once, each larger than a third of the budget: the oldest
    always has room to finish, so every one completes (a plain semaphore deadlocks)."""

    async def scenario() -> list[str]:
        budget = ByteBudget(100, max_file=60)
        done: list[str] = []

        async def receive(name: str, size: int) -> None:
            for _ in range(size // 10):
                await budget.acquire(10, name, name)
                await asyncio.sleep(0)
            await budget.close_file(name)
            done.append(name)
            await asyncio.sleep(0.01)  # pipeline and commit, then the bytes come back
            await budget.release(size, name)

        await asyncio.wait_for(
            asyncio.gather(receive("a", 60), receive("b", 50), receive("c", 50)), 5
        )
        assert budget.peak <= 100
        return done

    assert sorted(asyncio.run(scenario())) == ["a", "b", "c"]


def test_without_the_head_rule_the_same_files_deadlock() -> None:
    async def scenario() -> None:
        budget = ByteBudget(100)  # no max_file: no room kept for the oldest file

        async def receive(name: str, size: int) -> None:
            for _ in range(size // 10):
                await budget.acquire(10, name)
                await asyncio.sleep(0)

        await asyncio.wait_for(
            asyncio.gather(receive("a", 60), receive("b", 50), receive("c", 50)), 1
        )

    with pytest.raises(TimeoutError):
        asyncio.run(scenario())
