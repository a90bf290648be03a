"""Structured-output overhead per generated token at the StableLM-2 vocabulary size (100352): the time to compute
the allowed-token masks (xgrammar's fill_next_token_bitmask + our unpack to a bool mask, what the engine runs in a
thread while the model step runs), for 1 and 32 sequences, next to the model step it overlaps.

    python bench/structured_overhead.py [--vocab 100352] [--batch 1,32] [--step-ms 113,410]

The real Arcade100k tokenizer cannot be downloaded here, so the vocabulary is synthetic and byte-level: every
printable ASCII character as a token (so any JSON text can be spelled), the built-in model's 4096 BPE tokens, and
random 2-8 character words (with and without a leading space) up to --vocab entries. xgrammar's per-token cost
depends on how many tokens its precomputed tables leave undecided at each grammar state, which such a vocabulary
approximates (real BPE vocabularies have more multi-character punctuation tokens). The grammar is a JSON schema of
an object with a string, an integer, an enum and a list, walked one character token at a time through a valid
instance. --step-ms: model step times to compare with (defaults: 1.6B bf16 on the Zen 4, batch 1 from
bench/compare.py, batch 32 from bench/profile_step.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "kind": {"enum": ["cat", "dog", "bird"]},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age", "kind", "tags"]}
INSTANCE = '{"name": "Ada Lovelace", "age": 36, "kind": "cat", "tags": ["math", "engines", "poetry"]}'


def synthetic_vocab(size: int, seed: int = 0) -> list[str]:
    from stablelm_fast.tokenizer import Tokenizer
    import stablelm_fast
    builtin = os.path.join(os.path.dirname(stablelm_fast.__file__), "assets", "stablelm-pystdlib-4m")
    vocab = [chr(c) if chr(c) != " " else "\u0120" for c in range(33, 127)] + ["\u0120"]
    seen = set(vocab)
    for tok in Tokenizer(builtin).hf.get_vocab():
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,:;\"'()[]{}"
    while len(vocab) < size - 1:
        w = ("\u0120" if rng.random() < 0.5 else "") + "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    return vocab + ["<|endoftext|>"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=100352)
    p.add_argument("--batch", default="1,32")
    p.add_argument("--step-ms", default="113,410", help="model step ms for each batch size, to compare")
    args = p.parse_args(argv)
    import torch
    import xgrammar as xgr

    vocab = synthetic_vocab(args.vocab)
    ids = {t: i for i, t in enumerate(vocab)}
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=len(vocab), stop_token_ids=[len(vocab) - 1])
    t0 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    text = [("\u0120" if ch == " " else ch) for ch in INSTANCE]
    print(f"vocab {len(vocab)} (synthetic byte-level), schema compiled in {compile_s * 1e3:.0f} ms, "
          f"{len(text)} tokens per instance; torch threads {torch.get_num_threads()}")
    for batch, step_ms in zip([int(b) for b in args.batch.split(",")], [float(s) for s in args.step_ms.split(",")]):
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        fill, unpack = [], []
        for tok in text:
            bitmask = xgr.allocate_token_bitmask(batch, len(vocab))
            t0 = time.perf_counter()
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)
            t1 = time.perf_counter()
            bits = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).view(batch, -1)
            allowed = bits[:, : len(vocab)].bool()
            t2 = time.perf_counter()
            assert bool(allowed[0, ids[tok]]), f"the grammar refused {tok!r}"
            for m in matchers:
                assert m.accept_token(ids[tok])
            fill.append(t1 - t0)
            unpack.append(t2 - t1)
        f, u = statistics.median(fill) * 1e3, statistics.median(unpack) * 1e3
        print(f"batch {batch:3d}: mask fill {f:.3f} ms + unpack {u:.3f} ms per step (median over {len(text)} "
              f"tokens; max fill {max(fill) * 1e3:.2f} ms) = {(f + u) / step_ms:.2%} of a {step_ms:.0f} ms model "
              f"step, which it overlaps")


if __name__ == "__main__":
    main()
