"""Block manager and scheduler invariants under random workloads (hypothesis), without a model."""

from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_fast.engine.block_manager import BlockManager
from stablelm_fast.engine.scheduler import Scheduler
from stablelm_fast.engine.sequence import Sequence, SequenceStatus
from stablelm_fast.sampling_params import SamplingParams

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(1, 12)),
    st.tuples(st.just("step"), st.integers(0, 3)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
), min_size=1, max_size=60)


def _simulate_step(sched: Scheduler, budgets: dict[int, int], rng_token: int) -> None:
    batch = sched.schedule()
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert n >= 1
        assert len(seq.block_table) * sched.bm.block_size >= seq.num_computed_tokens + n
    sched.on_step_done(batch)
    for seq in batch.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(rng_token)
            budgets[seq.seq_id] -= 1
            if budgets[seq.seq_id] == 0:
                sched.finish(seq)
    assert len(sched.running) <= sched.max_num_seqs
    assert batch.num_tokens <= sched.max_num_batched_tokens


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(6, 40), st.integers(1, 6), st.booleans(), st.integers(1, 8), st.integers(3, 64))
def test_invariants_under_random_workloads(workload, num_blocks, block_size, prefix_caching, max_seqs, max_tokens):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens)
    live: list[Sequence] = []
    budgets: dict[int, int] = {}
    for op in workload:
        if op[0] == "add":
            _, tokens, out_len = op
            if -(-(len(tokens) + out_len) // block_size) > num_blocks:
                continue  # the engine refuses such requests up front
            seq = Sequence("r", 0, tokens, SamplingParams(max_tokens=out_len), None, 0.0)
            live.append(seq)
            budgets[seq.seq_id] = out_len
            sched.add(seq)
        elif op[0] == "step":
            for _ in range(op[1] + 1):
                _simulate_step(sched, budgets, rng_token=len(live) % 4)
        elif live:
            victim = live[op[1] % len(live)]
            if victim.status != SequenceStatus.FINISHED:
                sched.finish(victim)
        live = [s for s in live if s.status != SequenceStatus.FINISHED]
        bm.check_invariants(live)
    for _ in range(2000):  # drain: everything finishes, nothing hangs
        if not sched.has_work:
            break
        _simulate_step(sched, budgets, rng_token=1)
    assert not sched.has_work, "the scheduler stopped making progress"
    bm.check_invariants([])
    assert bm.num_free_blocks == num_blocks


def test_prefix_hits_are_verified_and_lru_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], SamplingParams(), None, 0.0)
    sched.add(a)
    sched.schedule()
    a.num_computed_tokens = 5
    sched.finish(a)
    assert len(bm.evictable) == 2  # [1,2] and [3,4] stay reusable
    b = Sequence("b", 0, [1, 2, 3, 4, 9], SamplingParams(), None, 0.0)
    assert len(bm.match_prefix(b)) == 2
    # a hash collision must not be trusted: corrupt the stored tokens of the first block
    first = bm.blocks[bm.match_prefix(b)[0]]
    first.token_ids = (7, 7)
    assert bm.match_prefix(b) == []
    first.token_ids = (1, 2)
    # allocating 3 fresh blocks with only 2 empty ones evicts the least recently used cached block
    c = Sequence("c", 0, [8] * 6, SamplingParams(), None, 0.0)
    sched.add(c)
    sched.schedule()
    assert len(bm.evictable) == 1
    assert bm.blocks[next(iter(bm.evictable))].token_ids == (1, 2)  # the prefix's head outlives its tail
    bm.check_invariants([c])


def test_reset_prefix_cache_forgets_published_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], SamplingParams(), None, 0.0)
    sched.add(a)
    sched.schedule()
    b = Sequence("b", 0, [1, 2, 3, 4, 9], SamplingParams(), None, 0.0)
    assert len(bm.match_prefix(b)) == 2
    bm.reset_prefix_cache()
    assert bm.match_prefix(b) == []
    sched.finish(a)
    assert len(bm.empty) == 4 and not bm.evictable
    bm.check_invariants([])



def test_lowest_free_block_first():
    """The lowest free block id is taken first: a cache committed as written stays as resident as its peak use."""
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seqs = [Sequence(r, 0, list(range(8)), SamplingParams(), None, 0.0) for r in "abc"]
    for seq in seqs:
        bm.admit(seq, [])
        bm.grow(seq, 8)
    assert [s.block_table for s in seqs] == [[0, 1], [2, 3], [4, 5]]
    bm.free(seqs[0])
    d = Sequence("d", 0, list(range(8)), SamplingParams(), None, 0.0)
    bm.admit(d, [])
    bm.grow(d, 8)
    assert sorted(d.block_table) == [0, 1]  # the freed blocks again, not the untouched 6 and 7
