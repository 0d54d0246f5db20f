"""Pure tests of `BatchQueue.next_batch` and `collate`: injected `now`, no event loop running, no
sleeps (how TGI and TEI test their queues)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from loopline.errors import DeadlineExceeded, Overloaded
from services.inference.batching import BatchQueue, Entry, Result, collate, padded_width

MakeEntry = Callable[..., Entry]
BIG = 1_000_000  # a token budget that never binds


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # Futures need a loop to belong to, never a running one: the queue must not need it.
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def entry(loop: asyncio.AbstractEventLoop) -> MakeEntry:
    def make(tokens: int, at: float = 0.0, deadline: float | None = None) -> Entry:
        future: asyncio.Future[Result] = loop.create_future()
        return Entry(list(range(1, tokens + 1)), future, at, deadline)

    return make


def queue_of(*entries: Entry, max_size: int = 100) -> BatchQueue:
    queue = BatchQueue(max_size)
    for e in entries:
        queue.put(e)
    return queue


def drain_order(queue: BatchQueue) -> list[Entry]:
    """What is left, in the order the queue keeps it (one request at a time takes the oldest)."""
    left: list[Entry] = []
    while len(queue):
        left += queue.next_batch(now=100.0, max_requests=1, max_tokens=BIG)
    return left


def test_empty_queue_gives_empty_batch() -> None:
    queue = BatchQueue(4)
    assert queue.next_batch(now=0.0, max_requests=8, max_tokens=BIG) == []
    assert queue.oldest_wait(now=5.0) == 0.0


def test_oldest_wait_is_measured_from_the_first_entry(entry: MakeEntry) -> None:
    queue = queue_of(entry(4, at=1.0), entry(4, at=2.5))
    assert queue.oldest_wait(now=3.0) == pytest.approx(2.0)


def test_cancelled_callers_are_dropped_before_compute(entry: MakeEntry) -> None:
    gone, kept = entry(4, at=0.0), entry(4, at=1.0)
    queue = queue_of(gone, kept)
    gone.future.cancel()

    assert queue.next_batch(now=2.0, max_requests=8, max_tokens=BIG) == [kept]
    assert len(queue) == 0


def test_expired_entries_fail_with_deadline_exceeded(entry: MakeEntry) -> None:
    expired = entry(4, at=0.0, deadline=1.0)
    on_time = entry(4, at=0.5, deadline=3.0)
    no_deadline = entry(4, at=0.6)
    queue = queue_of(expired, on_time, no_deadline)

    batch = queue.next_batch(now=2.0, max_requests=8, max_tokens=BIG)

    assert batch == [on_time, no_deadline]
    with pytest.raises(DeadlineExceeded) as caught:
        expired.future.result()
    assert caught.value.details["queued_seconds"] == pytest.approx(2.0)
    assert not on_time.future.done()


def test_deadline_equal_to_now_still_runs(entry: MakeEntry) -> None:
    just_in_time = entry(4, at=0.0, deadline=2.0)
    assert queue_of(just_in_time).next_batch(now=2.0, max_requests=8, max_tokens=BIG) == [
        just_in_time
    ]


def test_only_expired_entries_give_empty_batch_and_empty_queue(entry: MakeEntry) -> None:
    queue = queue_of(entry(4, deadline=1.0), entry(4, deadline=1.5))
    assert queue.next_batch(now=2.0, max_requests=8, max_tokens=BIG) == []
    assert len(queue) == 0


def test_batch_is_anchored_on_the_oldest_entry(entry: MakeEntry) -> None:
    # Many short newcomers would pad well together, but the long oldest one must not starve.
    oldest_long = entry(60, at=0.0)
    shorts = [entry(5, at=1.0 + i) for i in range(4)]
    queue = queue_of(oldest_long, *shorts)

    batch = queue.next_batch(now=10.0, max_requests=2, max_tokens=BIG)

    assert batch[0] is oldest_long


def test_similar_lengths_are_grouped_with_the_anchor(entry: MakeEntry) -> None:
    anchor = entry(30, at=0.0)
    far_short, near_long, far_long, near_short = (
        entry(3, at=1.0),
        entry(33, at=2.0),
        entry(90, at=3.0),
        entry(28, at=4.0),
    )
    queue = queue_of(anchor, far_short, near_long, far_long, near_short)

    batch = queue.next_batch(now=10.0, max_requests=3, max_tokens=BIG)

    assert batch == [anchor, near_short, near_long]  # distances 2 then 3
    assert drain_order(queue) == [far_short, far_long]


def test_equal_distance_prefers_the_older_entry(entry: MakeEntry) -> None:
    anchor = entry(20, at=0.0)
    newer_longer, older_shorter, oldest_same_gap = (
        entry(24, at=3.0),
        entry(16, at=2.0),
        entry(24, at=1.0),
    )
    queue = queue_of(anchor, oldest_same_gap, older_shorter, newer_longer)

    batch = queue.next_batch(now=10.0, max_requests=3, max_tokens=BIG)

    assert batch == [anchor, oldest_same_gap, older_shorter]


def test_max_requests_is_respected(entry: MakeEntry) -> None:
    queue = queue_of(*(entry(4, at=float(i)) for i in range(10)))
    assert len(queue.next_batch(now=20.0, max_requests=4, max_tokens=BIG)) == 4
    assert len(queue) == 6


def test_token_budget_counts_padded_width_rounded_to_eight(entry: MakeEntry) -> None:
    # 9 tokens pad to 16: three rows cost 48. A budget of 47 fits only two; unrounded (27) all.
    queue = queue_of(*(entry(9, at=float(i)) for i in range(3)))
    assert len(queue.next_batch(now=5.0, max_requests=8, max_tokens=47)) == 2

    queue = queue_of(*(entry(9, at=float(i)) for i in range(3)))
    assert len(queue.next_batch(now=5.0, max_requests=8, max_tokens=48)) == 3


def test_token_budget_uses_the_longest_row_in_the_batch(entry: MakeEntry) -> None:
    anchor = entry(8, at=0.0)
    longer = entry(17, at=1.0)  # pads to 24: two rows cost 48
    queue = queue_of(anchor, longer)
    assert queue.next_batch(now=5.0, max_requests=8, max_tokens=47) == [anchor]
    assert queue.next_batch(now=5.0, max_requests=8, max_tokens=47) == [longer]


def test_a_candidate_over_budget_does_not_block_a_shorter_one(entry: MakeEntry) -> None:
    anchor = entry(16, at=0.0)
    too_long = entry(20, at=1.0)  # nearer to the anchor, but 2 x 24 = 48 > 40
    fits = entry(10, at=2.0)  # 2 x 16 = 32
    queue = queue_of(anchor, too_long, fits)

    assert queue.next_batch(now=5.0, max_requests=8, max_tokens=40) == [anchor, fits]
    assert drain_order(queue) == [too_long]


def test_budget_sum_never_exceeded_across_many_lengths(entry: MakeEntry) -> None:
    rng = np.random.default_rng(7)
    queue = queue_of(*(entry(int(n), at=float(i)) for i, n in enumerate(rng.integers(1, 120, 60))))
    while len(queue):
        batch = queue.next_batch(now=100.0, max_requests=16, max_tokens=512)
        longest = max(e.tokens for e in batch)
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * padded_width(longest) <= 512


def test_an_entry_longer_than_the_budget_runs_alone(entry: MakeEntry) -> None:
    huge = entry(300, at=0.0)
    small = entry(4, at=1.0)
    queue = queue_of(huge, small)

    assert queue.next_batch(now=5.0, max_requests=8, max_tokens=64) == [huge]
    assert queue.next_batch(now=5.0, max_requests=8, max_tokens=64) == [small]


def test_remaining_entries_keep_arrival_order(entry: MakeEntry) -> None:
    entries = [entry(n, at=float(i)) for i, n in enumerate([10, 50, 11, 70, 12, 60])]
    queue = queue_of(*entries)

    assert queue.next_batch(now=10.0, max_requests=3, max_tokens=BIG) == [
        entries[0],
        entries[2],
        entries[4],
    ]
    assert drain_order(queue) == [entries[1], entries[3], entries[5]]


def test_put_raises_overloaded_when_full(entry: MakeEntry) -> None:
    queue = queue_of(entry(4), entry(4), max_size=2)

    with pytest.raises(Overloaded) as caught:
        queue.put(entry(4))

    assert caught.value.details == {"num_queued": 2, "max_queued": 2}
    assert len(queue) == 2


def test_put_reclaims_slots_of_cancelled_callers_before_refusing(entry: MakeEntry) -> None:
    gone = entry(4, at=0.0)
    kept = entry(4, at=1.0)
    queue = queue_of(gone, kept, max_size=2)
    gone.future.cancel()

    newcomer = entry(4, at=2.0)
    queue.put(newcomer)

    assert drain_order(queue) == [kept, newcomer]


def test_collate_pads_to_a_multiple_of_eight_with_a_mask() -> None:
    ids, mask = collate([[5, 6, 7], [1] * 9], pad_id=0)

    assert ids.dtype == np.int64
    assert mask.dtype == np.int64
    assert ids.shape == mask.shape == (2, 16)
    assert ids[0, :4].tolist() == [5, 6, 7, 0]
    assert mask.sum(axis=1).tolist() == [3, 9]
    assert (ids[mask == 0] == 0).all()


def test_a_lone_row_keeps_its_own_length() -> None:
    ids, mask = collate([[5, 6, 7]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7]]
    assert mask.tolist() == [[1, 1, 1]]
    assert collate([[]], pad_id=9)[0].tolist() == [[9]]  # never a zero width


def test_collate_uses_the_pad_id_and_never_a_zero_width() -> None:
    ids, mask = collate([[], [4]], pad_id=99)
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == [99] * 8
    assert mask.sum() == 1


@pytest.mark.parametrize(("longest", "width"), [(0, 8), (1, 8), (8, 8), (9, 16), (128, 128)])
def test_padded_width(longest: int, width: int) -> None:
    assert padded_width(longest) == width
    assert padded_width(longest, rows=3) == width
    assert padded_width(longest, rows=1) == max(1, longest)  # a lone row is not rounded up


def test_a_batch_stops_where_longer_candidates_would_cost_more_padding_than_they_save(
    entry: MakeEntry,
) -> None:
    # Anchor and three alike at 8 tokens, then four at 64: with a per-batch cost of 16 padded
    # tokens the 8-token rows run together (32 real / 48 cost) and the long ones wait, since
    # adding them would pad every short row to 64.
    short = [entry(8, at=float(i)) for i in range(4)]
    long = [entry(64, at=float(4 + i)) for i in range(4)]
    queue = queue_of(*short, *long)

    assert queue.next_batch(now=10.0, max_requests=8, max_tokens=BIG, overhead_tokens=16) == short
    assert queue.next_batch(now=10.0, max_requests=8, max_tokens=BIG, overhead_tokens=16) == long


def test_without_a_batch_cost_batches_fill_as_before(entry: MakeEntry) -> None:
    entries = [entry(n, at=float(i)) for i, n in enumerate([8, 8, 64, 64])]
    queue = queue_of(*entries)
    assert len(queue.next_batch(now=10.0, max_requests=8, max_tokens=BIG)) == 4


def test_a_high_batch_cost_still_fills_the_batch(entry: MakeEntry) -> None:
    # When a batch's fixed cost dwarfs padding (a GPU), one full batch beats two tight ones.
    entries = [entry(n, at=float(i)) for i, n in enumerate([8, 8, 64, 64])]
    queue = queue_of(*entries)
    assert (
        len(queue.next_batch(now=10.0, max_requests=8, max_tokens=BIG, overhead_tokens=10_000)) == 4
    )


def test_efficient_batches_never_lose_or_repeat_an_entry(entry: MakeEntry) -> None:
    rng = np.random.default_rng(11)
    entries = [entry(int(n), at=float(i)) for i, n in enumerate(rng.integers(1, 100, 80))]
    queue = queue_of(*entries)
    seen: list[Entry] = []
    while len(queue):
        batch = queue.next_batch(now=100.0, max_requests=32, max_tokens=4096, overhead_tokens=64)
        assert batch
        assert batch[0] is min((e for e in entries if e not in seen), key=lambda e: e.enqueued_at)
        seen += batch
    assert sorted(map(id, seen)) == sorted(map(id, entries))
