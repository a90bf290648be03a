"""BlockManager: pure CPU bookkeeping of the paged KV cache, with prefix caching.

Every block is either in use (ref_count > 0, in at least one block table), free and empty of anything reusable, or
free but still holding a full block of K/V that a later prompt may reuse (`evictable`, in least-recently-used order).
A full block is identified by a chained hash of (parent block's hash, its token ids); a hit is verified against the
stored token ids before it is reused. Evictable blocks are recycled, oldest first, only when no empty block is left.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from stablelm_fast.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1; got {num_blocks}, {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # NOTE: a min-heap: the lowest free block id is taken first, so a cache whose pages are committed as they are
        # first written (CPU, engine/kv_cache.py) stays as resident as its peak use, not its size.
        self.empty: list[int] = list(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free blocks with reusable K/V, LRU first
        self.hash_to_block: dict[int, int] = {}
        self.num_hit_blocks = 0  # prefix-cache hits since start (blocks reused at admission)
        self.num_queried_blocks = 0

    # ---- capacity ------------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.empty) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first num_tokens tokens have a slot."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # ---- allocation ----------------------------------------------------------------------------------------------

    def _take(self) -> int:
        if self.empty:
            block_id = heapq.heappop(self.empty)
        else:
            block_id, _ = self.evictable.popitem(last=False)  # evict the least recently used
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def _hash_of_block(self, seq: Sequence, index: int) -> int:
        parent = self.blocks[seq.block_table[index - 1]].hash if index > 0 else None
        start = index * self.block_size
        return block_hash(parent, tuple(seq.token_ids[start: start + self.block_size]))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the cache that hold seq's leading full blocks. At least one token is always left to compute
        (its logits are needed), so only blocks fully inside the first num_tokens - 1 tokens are looked up."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[index * self.block_size: (index + 1) * self.block_size])
            h = block_hash(parent, tokens)
            self.num_queried_blocks += 1
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:  # verified, not trusted
                break
            hits.append(block_id)
            parent = h
        return hits

    def can_admit(self, seq: Sequence, num_new_tokens: int, hits: list[int]) -> bool:
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        total = -(-(len(hits) * self.block_size + num_new_tokens) // self.block_size)
        return total - len(hits) <= self.num_free_blocks - reused_free

    def admit(self, seq: Sequence, hits: list[int]) -> int:
        """Give a waiting sequence its prefix-cache hits; -> the number of tokens they hold (already computed)."""
        assert not seq.block_table
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.evictable[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        self.num_hit_blocks += len(hits)
        return len(hits) * self.block_size

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for seq's first num_tokens tokens (call can_grow first)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take())

    def commit_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the blocks that num_tokens (computed or being computed this step) fill, for later prompts."""
        if not self.enable_prefix_caching:
            return
        for index in range(num_tokens // self.block_size):
            block = self.blocks[seq.block_table[index]]
            if block.hash is not None:
                continue
            h = self._hash_of_block(seq, index)
            block.hash = h
            block.token_ids = tuple(seq.token_ids[index * self.block_size: (index + 1) * self.block_size])
            self.hash_to_block.setdefault(h, block.block_id)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; full hashed blocks stay reusable until evicted. Later blocks are freed first so
        that a prefix's head outlives its tail in LRU order."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                    self.evictable[block_id] = None
                else:
                    block.hash, block.token_ids = None, ()
                    heapq.heappush(self.empty, block_id)
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget every published block (after a failed step, whose blocks may hold no valid K/V)."""
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        while self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            heapq.heappush(self.empty, block_id)

    # ---- invariants (tests) --------------------------------------------------------------------------------------

    def check_invariants(self, live: list[Sequence]) -> None:
        refs = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                refs[block_id] += 1
        free = set(self.empty) | set(self.evictable)
        assert len(free) == len(self.empty) + len(self.evictable), "a block is listed free twice"
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id}: ref_count {block.ref_count} " \
                                                               f"but in {refs[block.block_id]} block tables"
            assert (block.ref_count == 0) == (block.block_id in free), f"block {block.block_id} both free and used"
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h
