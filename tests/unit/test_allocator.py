"""The CUDA caching-allocator simulator (``strategies.cost.allocator``) against the rules of
``c10/cuda/CUDACachingAllocator.cpp``."""

from __future__ import annotations

import pytest
from galvatron.strategies.cost.allocator import (
    AllocatorOutOfMemory,
    CachingAllocator,
    events_from_snapshot,
    memory_needs,
    replay,
    round_size,
)

MiB = 1 << 20


def test_requests_round_up_to_512_bytes():
    allocator = CachingAllocator()
    for size in (1, 512, 513):
        allocator.malloc(size)
    assert allocator.stats.allocated == 512 + 512 + 1024
    assert round_size(0) == 512


@pytest.mark.parametrize(("size", "segment"), [
    (1, 2 * MiB), (MiB, 2 * MiB),  # small pool: kSmallBuffer
    (MiB + 1, 20 * MiB), (10 * MiB - 512, 20 * MiB),  # under kMinLargeAlloc: kLargeBuffer
    (10 * MiB, 10 * MiB), (10 * MiB + 1, 12 * MiB),  # rounded up to kRoundLarge
])
def test_new_segment_size(size, segment):
    allocator = CachingAllocator()
    allocator.malloc(size)
    assert (allocator.stats.reserved, allocator.stats.segments) == (segment, 1)


def test_best_fit_takes_the_smallest_fitting_block_then_the_lowest_address():
    allocator = CachingAllocator()
    handles = {size: allocator.malloc(size * MiB) for size in (12, 16, 14)}
    for handle in handles.values():
        allocator.free(handle)
    assert allocator.malloc(13 * MiB) == handles[14]
    assert allocator.stats.reserved == 42 * MiB

    first, second = allocator.malloc(20 * MiB), allocator.malloc(20 * MiB)
    allocator.free(second)
    allocator.free(first)
    assert allocator.malloc(20 * MiB) == first


@pytest.mark.parametrize(("request_size", "allocated"), [
    (11 * MiB, 12 * MiB),  # remainder exactly 1 MiB: the large pool keeps it in the block
    (11 * MiB - 512, 11 * MiB - 512),  # remainder over 1 MiB: split off as a free block
])
def test_large_pool_splits_only_remainders_over_1_mib(request_size, allocated):
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(12 * MiB))
    allocator.malloc(request_size)
    assert allocator.stats.allocated == allocated


def test_small_pool_splits_down_to_512_bytes():
    allocator = CachingAllocator()
    for size in (MiB, MiB - 512, 512):
        allocator.malloc(size)
    assert (allocator.stats.reserved, allocator.stats.segments) == (2 * MiB, 1)
    allocator.malloc(512)
    assert allocator.stats.reserved == 4 * MiB


def test_freed_block_merges_with_free_neighbours():
    allocator = CachingAllocator()
    a, b, c = (allocator.malloc(4 * MiB) for _ in range(3))
    for handle in (a, c, b):
        allocator.free(handle)
    assert allocator.malloc(20 * MiB) == a
    assert (allocator.stats.reserved, allocator.stats.segments) == (20 * MiB, 1)


def test_blocks_of_adjacent_segments_never_merge():
    allocator = CachingAllocator()
    a, b = allocator.malloc(10 * MiB), allocator.malloc(10 * MiB)
    allocator.free(a)
    allocator.free(b)
    allocator.malloc(20 * MiB)
    assert allocator.stats.reserved == 40 * MiB


def test_no_reuse_across_streams():
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(4 * MiB, stream=0))
    allocator.malloc(4 * MiB, stream=1)
    assert allocator.stats.reserved == 40 * MiB
    assert allocator.stats.reserved_by_stream == {0: 20 * MiB, 1: 20 * MiB}


def test_no_reuse_across_pools():
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(4 * MiB))
    allocator.malloc(4096)
    assert allocator.stats.reserved == 22 * MiB


def _fragment(allocator: CachingAllocator) -> None:
    """Four 20 MiB blocks, the second and fourth freed, then a 40 MiB request: 40 MiB is free but
    in two pieces."""
    handles = [allocator.malloc(20 * MiB) for _ in range(4)]
    allocator.free(handles[1])
    allocator.free(handles[3])
    allocator.malloc(40 * MiB)


def test_fragmented_free_space_needs_a_new_segment():
    allocator = CachingAllocator()
    _fragment(allocator)
    stats = allocator.stats
    assert (stats.reserved_peak, stats.allocated_peak, stats.segments) == (120 * MiB, 80 * MiB, 5)


def test_expandable_segment_extends_its_free_tail_on_the_same_pattern():
    allocator = CachingAllocator(expandable_segments=True)
    _fragment(allocator)
    stats = allocator.stats
    assert (stats.reserved_peak, stats.allocated_peak, stats.segments) == (100 * MiB, 80 * MiB, 1)


@pytest.mark.parametrize(("size", "mapped"), [(4096, 2 * MiB), (MiB + 512, 20 * MiB), (30 * MiB, 40 * MiB)])
def test_expandable_segment_maps_whole_pages(size, mapped):
    allocator = CachingAllocator(expandable_segments=True)
    allocator.malloc(size)
    assert allocator.stats.reserved == mapped


def test_expandable_large_pool_splits_remainders_from_512_bytes():
    allocator = CachingAllocator(expandable_segments=True)
    allocator.malloc(19 * MiB)  # a 1 MiB remainder, kept in the block without expandable segments
    assert allocator.stats.allocated == 19 * MiB


def test_expandable_best_fit_prefers_a_hole_to_the_growable_tail():
    allocator = CachingAllocator(expandable_segments=True)
    allocator.malloc(4 * MiB)
    hole = allocator.malloc(8 * MiB)
    allocator.malloc(2 * MiB)  # leaves a 6 MiB free tail before the unmapped space
    allocator.free(hole)
    assert allocator.malloc(5 * MiB) == hole


def test_capacity_releases_free_unsplit_segments_then_raises():
    allocator = CachingAllocator(capacity=60 * MiB)
    allocator.malloc(4 * MiB)  # a 20 MiB segment, 16 MiB of it free: split, so kept
    allocator.free(allocator.malloc(18 * MiB))  # a free 18 MiB segment: released
    allocator.malloc(24 * MiB)
    assert (allocator.stats.reserved, allocator.stats.segments) == (44 * MiB, 2)
    with pytest.raises(AllocatorOutOfMemory):
        allocator.malloc(20 * MiB)


def test_capacity_unmaps_free_pages_of_expandable_segments():
    allocator = CachingAllocator(expandable_segments=True, capacity=60 * MiB)
    allocator.free(allocator.malloc(40 * MiB, stream=0))
    allocator.malloc(40 * MiB, stream=1)
    stats = allocator.stats
    assert (stats.reserved, stats.reserved_peak, stats.segments) == (40 * MiB, 40 * MiB, 1)


def test_replay_pairs_frees_with_allocs_by_recorded_address():
    stats = replay([
        ("alloc", 0x100, 12 * MiB, 0),
        ("alloc", 0x200, 16 * MiB, 0),
        ("free", 0x100, 12 * MiB, 0),
        ("segment_alloc", 0x100, 12 * MiB, 0),
        ("free", 0x999, 4 * MiB, 0),  # allocated before the trace began
        ("alloc", 0x100, 12 * MiB, 0),
    ])
    assert (stats.allocated, stats.allocated_peak, stats.reserved_peak) == (28 * MiB, 28 * MiB, 28 * MiB)
    assert stats.unpaired_frees == 1


def test_replay_counts_frees_of_earlier_blocks_even_where_the_address_is_reused():
    stats = replay([("free", 0x300, MiB, 0), ("alloc", 0x300, MiB, 0), ("free", 0x300, MiB, 0)])
    assert (stats.unpaired_frees, stats.allocated) == (1, 0)


def test_events_from_snapshot_keeps_allocs_and_completed_frees():
    trace = [
        {"action": "segment_alloc", "addr": 0x100, "size": 20 * MiB, "stream": 0},
        {"action": "alloc", "addr": 0x100, "size": 1000, "stream": 0, "frames": []},
        {"action": "free_requested", "addr": 0x100, "size": 1000, "stream": 0},  # used on another stream
        {"action": "alloc", "addr": 0x400, "size": 1000, "stream": 0},
        {"action": "free_completed", "addr": 0x100, "size": 1000, "stream": 0},
    ]
    assert events_from_snapshot(trace) == [
        ("alloc", 0x100, 1000, 0), ("alloc", 0x400, 1000, 0), ("free", 0x100, 1000, 0)]


def test_least_memory_lies_between_allocated_and_reserved_and_runs():
    # two 30 MiB tensors, the first freed while a 1 MiB block shares its segment: a 40 MiB request
    # then needs a new segment that the pinned one cannot make room for
    events = [("alloc", 1, 30 * MiB, 0), ("alloc", 2, 30 * MiB, 0), ("free", 1, 0, 0),
              ("alloc", 3, 2 * MiB, 0), ("alloc", 4, 40 * MiB, 0)]
    stats, need = memory_needs(events, tolerance=MiB)
    assert stats == replay(events)
    assert stats.allocated_peak <= need <= stats.reserved_peak
    replay(events, capacity=need)  # runs
    with pytest.raises(AllocatorOutOfMemory):
        replay(events, capacity=need - 2 * MiB)
    assert need > stats.allocated_peak + 20 * MiB  # the 28 MiB hole left in the first segment is lost
