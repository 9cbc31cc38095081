"""A simulator of PyTorch's CUDA caching allocator, to predict ``torch.cuda.max_memory_reserved()``
from a sequence of allocations and frees.

The rules are those of ``DeviceCachingAllocator`` in ``c10/cuda/CUDACachingAllocator.cpp``, which
are the same in torch 2.5 and in the 2.9+ file that reads its settings from
``AcceleratorAllocatorConfig``, under the default settings:

- ``round_size``: a request rounds up to a multiple of ``kMinBlockSize`` (512 B), at least 512 B.
- ``get_pool``, ``BlockComparatorSize``: rounded sizes up to ``kSmallSize`` (1 MiB) go to the small
  pool, larger ones to the large pool; a pool orders its free blocks by (stream, size, address),
  so a free block serves only requests of its own stream and pool.
- ``get_free_block``: ``lower_bound`` picks the smallest free block that fits, the lowest address
  among equal sizes. With expandable segments a free block that borders unmapped space counts as
  its size plus that space, so best fit steps past it while a later block is smaller by that count.
- ``get_allocation_size``: a new segment is 2 MiB (``kSmallBuffer``) for a small request, 20 MiB
  (``kLargeBuffer``, ``large_segment_size`` in 2.9+) for a large one under 10 MiB
  (``kMinLargeAlloc``), else the request rounded up to 2 MiB (``kRoundLarge``).
- ``should_split``, ``alloc_found_block``: the request takes the front of the found block and the
  rest stays free in the same segment when it is >= 512 B (small pool, or any pool with expandable
  segments) or > 1 MiB (large pool).
- ``free_block``, ``try_merge_blocks``: a freed block merges with its free neighbours; neighbours are
  linked only inside one segment, so segments never merge.
- ``malloc``, ``alloc_block``, ``release_cached_blocks``, ``release_blocks``, ``unmap_block``: when
  the device cannot hold a new segment, every free unsplit segment of every stream is released and
  every free whole page of an expandable segment unmapped, then the allocation is retried once
  before the out-of-memory error. Segments are otherwise kept for good.
- ``find_expandable_block``, ``map_block``, ``try_allocate_expandable_block``
  (``expandable_segments:True``): one virtual segment per stream and pool, mapped in pages of 2 MiB
  (small pool) or 20 MiB (large pool). A request that fits no free block maps just enough pages at
  the lowest address where free and unmapped space run long enough: normally the end of the mapped
  part, extending its free tail. Reserved bytes are the mapped bytes.

Not modelled: ``max_split_size_mb``, ``roundup_power2_divisions``, the garbage-collection threshold
and memory fraction (all off by default); ``recordStream`` events (a replayed trace frees a block
at its ``free_completed``, after its events); CUDA-graph and ``MemPool`` private pools; device
addresses, which here grow with each new segment and so decide ties between equal-size free blocks
where the device's would.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

MIN_BLOCK_SIZE = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: the largest small-pool request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: a small-pool segment, and a small-pool expandable page
LARGE_BUFFER = 20 << 20  # kLargeBuffer: a segment for 1-10 MiB requests, and a large-pool page
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge
# Address space of one expandable segment; the source reserves 1.125x (2.9+: 2x) the device memory,
# which no request reaches. A multiple of both page sizes.
_VIRTUAL_SIZE = 1 << 45
_FIRST_ADDRESS = 1 << 40


def round_size(size: int) -> int:
    """The block size a request of ``size`` bytes takes (``round_size``)."""
    if size < 0:
        raise ValueError(f"negative allocation size {size}")
    return max(MIN_BLOCK_SIZE, -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE)


def allocation_size(size: int) -> int:
    """The size of the segment cudaMalloc'd for a rounded request that no free block fits
    (``get_allocation_size``)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class AllocatorOutOfMemory(MemoryError):
    """A request that does not fit in the capacity even after the cached segments were released."""


@dataclass
class AllocatorStats:
    """Byte counts in the sense of ``torch.cuda.memory_stats()``."""

    allocated_peak: int
    """Peak of ``allocated``: ``torch.cuda.max_memory_allocated()``."""
    reserved_peak: int
    """Peak of ``reserved``: ``torch.cuda.max_memory_reserved()``."""
    allocated: int
    """Bytes of allocated blocks (block sizes, so rounded and including unsplit remainders)."""
    reserved: int
    """Bytes held in segments: cudaMalloc'd, or mapped pages of expandable segments."""
    segments: int
    """Segments held: cudaMalloc'd ones, or virtual expandable ones."""
    reserved_by_stream: dict[int, int]
    """Peak of each stream's reserved bytes."""
    unpaired_frees: int = 0
    """:func:`replay`: frees of blocks allocated before the trace began (0: it started on an empty
    allocator, and its numbers are the run's; otherwise they are lower bounds)."""


class _Segment:
    """An expandable segment: its virtual base address and page size."""

    __slots__ = ("base", "page")

    def __init__(self, base: int, page: int) -> None:
        self.base = base
        self.page = page


class _Pool:
    """One stream's free blocks of one size class (a ``BlockPool`` restricted to one stream)."""

    __slots__ = ("free", "small", "stream", "unmapped")

    def __init__(self, stream: int, small: bool) -> None:
        self.stream = stream
        self.small = small
        self.free: list[tuple[int, int, _Block]] = []  # (size, address, block), sorted
        self.unmapped: list[tuple[int, _Block]] = []  # (address, block), sorted


class _Block:
    """A range of a segment, linked to its neighbours in that segment. ``segment`` is None for a
    cudaMalloc'd segment; ``mapped`` is False only for unmapped space of an expandable one."""

    __slots__ = ("addr", "allocated", "mapped", "next", "pool", "prev", "segment", "size")

    def __init__(self, addr: int, size: int, pool: _Pool, segment: _Segment | None, mapped: bool = True) -> None:
        self.addr = addr
        self.size = size
        self.pool = pool
        self.segment = segment
        self.mapped = mapped
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


def _splice(block: _Block, before: _Block | None, after: _Block | None) -> None:
    """Link ``block`` between two neighbours (``Block::splice``)."""
    block.prev, block.next = before, after
    if before is not None:
        before.next = block
    if after is not None:
        after.prev = block


def _grown_size(block: _Block) -> int:
    """A free block's size counting the unmapped space after it (``expandable_size``)."""
    after = block.next
    return block.size + (after.size if after is not None and not after.mapped else 0)


class CachingAllocator:
    """PyTorch's CUDA caching allocator on one device, without the device: ``malloc`` and ``free``
    move blocks between segments exactly as the source does and count reserved bytes.

    ``capacity`` bounds reserved bytes the way device memory bounds cudaMalloc; None is unbounded.
    """

    def __init__(self, *, expandable_segments: bool = False, capacity: int | None = None) -> None:
        self.expandable_segments = expandable_segments
        self.capacity = capacity
        self._pools: dict[tuple[int, bool], _Pool] = {}
        self._live: dict[int, _Block] = {}
        self._next_address = _FIRST_ADDRESS
        self._allocated = self._allocated_peak = 0
        self._reserved = self._reserved_peak = 0
        self._segments = 0
        self._stream_reserved: dict[int, int] = {}
        self._stream_peak: dict[int, int] = {}

    @property
    def stats(self) -> AllocatorStats:
        """Current and peak byte counts."""
        return AllocatorStats(
            allocated_peak=self._allocated_peak, reserved_peak=self._reserved_peak, allocated=self._allocated,
            reserved=self._reserved, segments=self._segments, reserved_by_stream=dict(self._stream_peak))

    def malloc(self, size: int, stream: int = 0) -> int:
        """Allocate ``size`` bytes for ``stream``; returns the block's simulated address."""
        size = round_size(size)
        key = (stream, size <= SMALL_SIZE)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(*key)
        block = self._take_free(pool, size) or self._new_block(pool, size)
        if self._should_split(block, size):
            block = self._split(block, size)
        block.allocated = True
        self._live[block.addr] = block
        self._allocated += block.size
        self._allocated_peak = max(self._allocated_peak, self._allocated)
        return block.addr

    def free(self, handle: int) -> None:
        """Return the block ``malloc`` handed out as ``handle`` to its pool (``free_block``)."""
        block = self._live.pop(handle, None)
        if block is None:
            raise ValueError(f"{handle:#x} is not an allocated block")
        block.allocated = False
        self._allocated -= block.size
        self._merge(block, block.prev)
        self._merge(block, block.next)
        self._insert_free(block)

    def _take_free(self, pool: _Pool, size: int) -> _Block | None:
        """Remove and return the best-fitting free block of ``pool`` (``get_free_block``)."""
        free = pool.free
        i = bisect_left(free, (size, -1))
        if i == len(free):
            return None
        if self.expandable_segments:
            while i + 1 < len(free) and _grown_size(free[i + 1][2]) < _grown_size(free[i][2]):
                i += 1
        return free.pop(i)[2]

    def _should_split(self, block: _Block, size: int) -> bool:
        """Whether the rest of ``block`` after ``size`` bytes becomes a free block (``should_split``)."""
        rest = block.size - size
        if block.pool.small or self.expandable_segments:
            return rest >= MIN_BLOCK_SIZE
        return rest > SMALL_SIZE

    def _new_block(self, pool: _Pool, size: int) -> _Block:
        """A fresh free block of at least ``size`` bytes, out of the pool's free set; releases the
        cache and retries once when the capacity is reached (``malloc``'s fallbacks)."""
        grow = self._map_expandable if self.expandable_segments else self._cuda_malloc
        block = grow(pool, size)
        if block is None:
            self._release_cached()
            block = grow(pool, size)
        if block is None:
            raise AllocatorOutOfMemory(
                f"cannot allocate {size} bytes on stream {pool.stream}: {self._reserved} of {self.capacity} bytes "
                f"reserved, {self._allocated} allocated")
        return block

    def _split(self, block: _Block, size: int) -> _Block:
        """Cut ``size`` bytes off the front of ``block``; the rest stays free (``alloc_found_block``)."""
        front = _Block(block.addr, size, block.pool, block.segment)
        _splice(front, block.prev, block)
        block.addr += size
        block.size -= size
        self._insert_free(block)
        return front

    def _cuda_malloc(self, pool: _Pool, size: int) -> _Block | None:
        """A new segment for a request of ``size`` bytes, or None past the capacity (``alloc_block``)."""
        segment_size = allocation_size(size)
        if not self._fits(segment_size):
            return None
        self._segments += 1
        self._reserve(pool.stream, segment_size)
        return _Block(self._take_address(segment_size), segment_size, pool, None)

    def _map_expandable(self, pool: _Pool, size: int) -> _Block | None:
        """Map pages until a free block of ``size`` bytes exists, or None past the capacity
        (``try_allocate_expandable_block``)."""
        block = self._find_expandable(pool, size)
        if not block.mapped and not self._map(block, min(block.size, size)):
            return None
        while block.size < size:
            after = block.next  # unmapped: find_expandable_block found a long enough run
            if not self._map(after, min(size - block.size, after.size)):
                return None
            block = after
        self._remove_free(block)
        return block

    def _find_expandable(self, pool: _Pool, size: int) -> _Block:
        """The lowest-address run of free and unmapped blocks of ``size`` bytes, in a new segment
        if none has one (``find_expandable_block``)."""
        for _, block in pool.unmapped:
            if block.prev is not None and not block.prev.allocated:
                block = block.prev
            room, run = 0, block
            while room < size and run is not None and not run.allocated:
                room += run.size
                run = run.next
            if room >= size:
                return block
        segment = _Segment(self._take_address(_VIRTUAL_SIZE), SMALL_BUFFER if pool.small else LARGE_BUFFER)
        self._segments += 1
        block = _Block(segment.base, _VIRTUAL_SIZE, pool, segment, mapped=False)
        insort(pool.unmapped, (block.addr, block))
        return block

    def _map(self, block: _Block, size: int) -> bool:
        """Map the pages covering the first ``size`` bytes of unmapped ``block`` and merge them with
        free neighbours; False past the capacity (``map_block``)."""
        segment, pool = block.segment, block.pool
        mapped = -(-size // segment.page) * segment.page
        if not self._fits(mapped):
            return False
        self._remove_unmapped(block)
        block.mapped = True
        if mapped < block.size:
            rest = _Block(block.addr + mapped, block.size - mapped, pool, segment, mapped=False)
            _splice(rest, block, block.next)
            insort(pool.unmapped, (rest.addr, rest))
            block.size = mapped
        self._merge(block, block.prev)
        self._merge(block, block.next)
        self._insert_free(block)
        self._reserve(pool.stream, mapped)
        return True

    def _release_cached(self) -> None:
        """Release every free unsplit segment and unmap every free page, large pools first
        (``release_cached_blocks``)."""
        for small in (False, True):
            for pool in [p for p in self._pools.values() if p.small is small]:
                self._release_pool(pool)

    def _release_pool(self, pool: _Pool) -> None:
        """``release_blocks`` for one pool."""
        to_unmap = []
        for _, _, block in list(pool.free):
            if block.segment is not None:
                to_unmap.append(block)
            elif block.prev is None and block.next is None:
                self._remove_free(block)
                self._segments -= 1
                self._reserve(pool.stream, -block.size)
        for block in to_unmap:
            self._unmap(block)
            if not block.mapped and block.prev is None and block.next is None:
                self._remove_unmapped(block)
                self._segments -= 1

    def _unmap(self, block: _Block) -> None:
        """Unmap the whole pages inside free ``block``; partial pages at either end stay free blocks
        (``unmap_block``)."""
        segment, pool = block.segment, block.pool
        page, offset = segment.page, block.addr - segment.base
        begin = -(-offset // page) * page
        end = (offset + block.size) // page * page
        if begin >= end:
            return
        self._remove_free(block)
        start, end = segment.base + begin, segment.base + end
        if start > block.addr:
            before = _Block(block.addr, start - block.addr, pool, segment)
            _splice(before, block.prev, block)
            self._insert_free(before)
        if block.addr + block.size > end:
            after = _Block(end, block.addr + block.size - end, pool, segment)
            _splice(after, block, block.next)
            self._insert_free(after)
        block.addr, block.size, block.mapped = start, end - start, False
        self._merge(block, block.prev)
        self._merge(block, block.next)
        insort(pool.unmapped, (block.addr, block))
        self._reserve(pool.stream, start - end)

    def _merge(self, block: _Block, other: _Block | None) -> None:
        """Absorb neighbour ``other`` into ``block`` if it is free and equally mapped
        (``try_merge_blocks``); ``block`` is in no set while this runs."""
        if other is None or other.allocated or other.mapped != block.mapped:
            return
        if other.mapped:
            self._remove_free(other)
        else:
            self._remove_unmapped(other)
        if other is block.prev:
            block.addr = other.addr
            _splice(block, other.prev, block.next)
        else:
            _splice(block, block.prev, other.next)
        block.size += other.size

    def _fits(self, size: int) -> bool:
        """Whether ``size`` more reserved bytes stay within the capacity."""
        return self.capacity is None or self._reserved + size <= self.capacity

    def _reserve(self, stream: int, size: int) -> None:
        """Count ``size`` (negative when released) reserved bytes for ``stream`` and the device."""
        self._reserved += size
        self._reserved_peak = max(self._reserved_peak, self._reserved)
        current = self._stream_reserved[stream] = self._stream_reserved.get(stream, 0) + size
        self._stream_peak[stream] = max(self._stream_peak.get(stream, 0), current)

    def _take_address(self, size: int) -> int:
        """Fresh simulated device addresses for a segment of ``size`` bytes."""
        address = self._next_address
        self._next_address += size
        return address

    @staticmethod
    def _insert_free(block: _Block) -> None:
        insort(block.pool.free, (block.size, block.addr, block))

    @staticmethod
    def _remove_free(block: _Block) -> None:
        free = block.pool.free
        del free[bisect_left(free, (block.size, block.addr))]

    @staticmethod
    def _remove_unmapped(block: _Block) -> None:
        unmapped = block.pool.unmapped
        del unmapped[bisect_left(unmapped, (block.addr,))]


def replay(events: Iterable[tuple[str, int, int, int]], *, expandable_segments: bool = False,
           capacity: int | None = None) -> AllocatorStats:
    """Run a recorded sequence of ``(action, addr, size, stream)`` events through a fresh allocator.

    ``action`` is "alloc" or "free"; other actions are skipped. ``addr`` is the recorded address,
    used only to pair a free with its alloc; a free of a block allocated before the trace began is
    skipped and counted (``unpaired_frees``), so a trace should start on an empty allocator
    (recording from the process start, or after ``torch.cuda.empty_cache()`` with no live tensors)."""
    allocator = CachingAllocator(expandable_segments=expandable_segments, capacity=capacity)
    handles: dict[int, int] = {}
    unpaired = 0
    for action, addr, size, stream in events:
        if action == "alloc":
            handles[addr] = allocator.malloc(size, stream)
        elif action == "free":
            if addr in handles:
                allocator.free(handles.pop(addr))
            else:
                unpaired += 1
    return replace(allocator.stats, unpaired_frees=unpaired)


def events_from_snapshot(trace: Iterable[Mapping[str, Any]]) -> list[tuple[str, int, int, int]]:
    """The events :func:`replay` takes, from ``torch.cuda.memory._snapshot()["device_traces"][i]``.

    A block returns to its pool at "free_completed" (``free_block``), which follows "free_requested"
    once the block's cross-stream events complete; an "alloc" entry's size is the requested size,
    which :func:`replay` rounds as the allocator does."""
    actions = {"alloc": "alloc", "free_completed": "free"}
    return [(actions[e["action"]], e["addr"], e["size"], e["stream"]) for e in trace if e["action"] in actions]


class MemoryNeeds(NamedTuple):
    """What a recorded trace needs under one allocator mode (:func:`memory_needs`)."""

    stats: AllocatorStats
    """Its replay on an unbounded device: the allocated and reserved peaks."""
    least_memory: int
    """The least device memory (bytes) it runs in without an out-of-memory error."""


def memory_needs(events: Sequence[tuple[str, int, int, int]], *, expandable_segments: bool = False,
                 tolerance: int = 64 << 20) -> MemoryNeeds:
    """A trace's replay and the least device memory it runs in (within ``tolerance`` bytes): between
    its allocated peak (no allocator needs less) and its reserved peak (where the allocator never had
    to release a cached segment), by bisection. Above the allocated peak it is what fragmentation
    inside segments costs: cached free blocks of a segment that still holds a live block cannot be
    released to make room."""
    free_run = replay(events, expandable_segments=expandable_segments)
    low, high = free_run.allocated_peak, free_run.reserved_peak
    while high - low > tolerance:
        mid = (low + high) // 2
        try:
            replay(events, expandable_segments=expandable_segments, capacity=mid)
            high = mid
        except AllocatorOutOfMemory:
            low = mid
    return MemoryNeeds(free_run, high)
