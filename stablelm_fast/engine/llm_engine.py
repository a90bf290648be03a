"""LLMEngine: the synchronous engine loop. step() = schedule -> run the model -> sample -> postprocess.

Used directly by `LLM` (offline batches) and from the engine thread of `AsyncLLM` (servers). The pieces it joins:
InputProcessor (validate, tokenize), Scheduler (+ BlockManager: what runs, the only writer of
num_computed_tokens), prepare_step (the flat step, the rows to sample), an Executor (runs the model), Sampler,
OutputProcessor (detokenize, stops, RequestOutputs).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from stablelm_fast.config import ModelConfig, resolve_device, resolve_dtype
from stablelm_fast.engine import kv_cache
from stablelm_fast.engine.block_manager import BlockManager
from stablelm_fast.engine.draft_model import DraftModel
from stablelm_fast.engine.executor import Executor, make_executor
from stablelm_fast.engine.input_processor import InputProcessor, ProcessedPrompt
from stablelm_fast.engine.output_processor import OutputProcessor
from stablelm_fast.engine.scheduler import Scheduler
from stablelm_fast.engine.sequence import Request, Sequence
from stablelm_fast.engine.spec_decode import SpeculativeConfig, ngram_propose, verify
from stablelm_fast.engine.stats import FINISHED_LOG_LEN, EngineStats, FinishedRequest, StatsLogger
from stablelm_fast.engine.step_input import prepare_step
from stablelm_fast.layers.sampler import Sampler, SamplingRow
from stablelm_fast.ops import resolve_backend
from stablelm_fast.outputs import RequestOutput
from stablelm_fast.quantization import resolve_quant_config
from stablelm_fast.sampling_params import SamplingParams
from stablelm_fast.structured_outputs import StructuredOutputManager
from stablelm_fast.tokenizer import Tokenizer


@dataclass
class EngineArgs:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    load_format: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    backend: str = "auto"
    seed: int = 0
    speculative_config: dict | None = None  # vLLM's: {"method": "ngram", "num_speculative_tokens": k, ...}
    quantization: str | None = None  # 'int8' | 'int4' | 'gptq' | 'awq' (None: as config.json says); quantization/
    quantization_config: dict | None = None  # int8 / int4: {"group_size": 64, "sym": True, "lm_head": False}
    disable_log_stats: bool = True  # no periodic throughput/load log line (AsyncLLM turns it on)

    def validate(self) -> None:
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy'; got {self.load_format!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {self.device!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1; got {self.tensor_parallel_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1; got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        args.validate()
        self.args = args
        self.config = ModelConfig.from_pretrained(args.model)
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.config, self.device)
        self.backend = resolve_backend(args.backend, self.device)
        self.max_model_len = args.max_model_len or self.config.max_position_embeddings
        if not 1 <= self.max_model_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_model_len must be in [1, {self.config.max_position_embeddings}] "
                             f"(max_position_embeddings); got {self.max_model_len}")
        self.tokenizer = Tokenizer(args.model, self.config.eos_token_id)
        self.spec_config = SpeculativeConfig.from_dict(args.speculative_config)
        # a draft model (speculative decoding) runs here, unsharded, with its own cache over the target's blocks;
        # loaded first, so that a draft of another vocabulary is refused before any tensor-parallel worker starts
        self.drafter = DraftModel(self.spec_config.model, self.config, self.tokenizer, self.max_model_len,
                                  args.load_format, self.dtype, self.device, self.backend, args.seed) \
            if self.spec_config is not None and self.spec_config.method == "draft_model" else None
        model_dir = None if args.load_format == "dummy" else args.model
        self.quant_config = resolve_quant_config(args.quantization, args.quantization_config, args.model,
                                                 args.load_format)
        self.executor: Executor = make_executor(self.config, model_dir, args.load_format, self.dtype, self.device,
                                                self.backend, args.tensor_parallel_size, args.seed,
                                                self.quant_config.to_dict() if self.quant_config else None)
        bytes_per_block = self.executor.kv_bytes_per_block(args.block_size) + (
            self.drafter.kv_bytes_per_block(args.block_size) if self.drafter is not None else 0)
        num_blocks = args.num_kv_blocks or kv_cache.default_num_blocks(
            bytes_per_block, args.block_size, self.max_model_len, args.max_num_seqs, self.device,
            args.kv_cache_memory_gb)
        for runner in [self.executor] + ([self.drafter] if self.drafter is not None else []):
            runner.allocate_kv_cache(num_blocks, args.block_size)
            runner.enable_cuda_graphs(args.max_num_seqs, -(-self.max_model_len // args.block_size))
        kv_cache.logger.info(kv_cache.describe(num_blocks, args.block_size, bytes_per_block, self.max_model_len,
                                               self.device))
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        max_batched = args.max_num_batched_tokens or max(self.max_model_len, 2048)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, max_batched,
                                   propose=self._propose if self.spec_config is not None else None)
        self.structured = StructuredOutputManager(self.tokenizer, self.config.vocab_size)
        self.input_processor = InputProcessor(self.tokenizer, self.config.vocab_size, self.max_model_len,
                                              args.block_size, num_blocks, self.structured)
        self._mask_pool: ThreadPoolExecutor | None = None  # structured-output masks, computed during the step
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len, self.scheduler)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self._next_id = 0
        self.num_steps = 0
        self.num_prompt_tokens_computed = 0
        self.num_spec_proposed = self.num_spec_accepted = 0  # draft tokens (speculative decoding)
        self.num_generation_tokens = 0
        self.finished: deque[FinishedRequest] = deque(maxlen=FINISHED_LOG_LEN)  # drained by exporters (/metrics)
        self._stats_logger = None if args.disable_log_stats else StatsLogger()
        torch.manual_seed(args.seed)

    # ---- requests --------------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | dict | ProcessedPrompt, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request. A raw prompt is validated first (ValueError, nothing queued, on bad input); a
        ProcessedPrompt from self.input_processor was validated already and carries its resolved params."""
        if not isinstance(prompt, ProcessedPrompt):
            prompt = self.input_processor.process(prompt, params)
        text, ids, params = prompt.prompt, prompt.prompt_token_ids, prompt.params
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        now = arrival_time or time.monotonic()
        seqs = [Sequence(request_id, i, ids, params, self.tokenizer, now) for i in range(params.n)]
        for seq in seqs:
            seq.matcher = self.structured.matcher(prompt.grammar) if prompt.grammar is not None else None
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, now)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.output_processor.finish(seq, "abort", None)
        out = self.output_processor.make_output(req)
        self._record_finished(req)  # counted as finished_reason "abort" (vLLM's request_success)
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the loop --------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the outputs of every request that made progress (finished ones last seen)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        try:
            # a draft model fills the placeholder drafts of this batch (and writes its own cache) first
            draft_probs = self.drafter.propose(batch, self._sampling_row) if self.drafter is not None else {}
            step = prepare_step(batch, self.block_manager.block_size)
            masks = self._start_masks([batch.seqs[i] for i in step.sample_seqs])
            logits = self.executor.execute(step)
        except Exception:
            # NOTE: blocks this step was writing were already published to the prefix cache; forget them all.
            self.block_manager.reset_prefix_cache()
            raise
        self.num_steps += 1
        self.num_prompt_tokens_computed += self.scheduler.on_step_done(batch)
        allowed = masks.result() if masks is not None else {}
        touched: dict[str, Request] = {}
        out = self.output_processor
        for i, first_row, count, first_pos in step.prompt_logprob_rows:
            seq = batch.seqs[i]
            out.append_prompt_logprobs(self.requests[seq.request_id], seq, first_pos,
                                       logits[first_row: first_row + count])
        if step.sample_seqs:
            sample_logits = logits[logits.shape[0] - sum(step.sample_rows):]
            offsets = list(itertools.accumulate(step.sample_rows, initial=0))
            plain = [k for k, n in enumerate(step.sample_rows) if n == 1]
            emitted: dict[int, tuple[list[int], list]] = {}
            if plain:  # one batched draw for every sequence without drafts
                seqs = [batch.seqs[step.sample_seqs[k]] for k in plain]
                rows = [self._sampling_row(s, allowed=allowed.get(s.seq_id)) for s in seqs]
                tokens, lps = self.sampler(sample_logits[[offsets[k] for k in plain]], rows)
                emitted.update({k: ([t], [lp]) for k, t, lp in zip(plain, tokens, lps)})
            for k, n in enumerate(step.sample_rows):
                if n > 1:  # drafts: verify them against the target's rows
                    seq = batch.seqs[step.sample_seqs[k]]
                    drafts = seq.spec_token_ids
                    rows = [self._sampling_row(seq, drafts[:j]) for j in range(n)]
                    emitted[k] = verify(self.sampler, sample_logits[offsets[k]: offsets[k] + n], rows, drafts,
                                        draft_probs.get(seq.seq_id))
                    self.num_spec_proposed += len(drafts)
                    self.num_spec_accepted += len(emitted[k][0]) - 1
                    self.scheduler.on_spec_verified(seq, len(emitted[k][0]) - 1)
            now = time.monotonic()
            for k in range(len(step.sample_seqs)):
                seq = batch.seqs[step.sample_seqs[k]]
                req = self.requests[seq.request_id]
                for token, lp in zip(*emitted[k]):
                    if seq.is_finished:  # a stop inside the accepted drafts: the rest is dropped
                        break
                    out.append_token(req, seq, token, lp, now)
                    self.num_generation_tokens += 1
                touched[seq.request_id] = req
        if self.drafter is not None:
            self.drafter.after_step(batch)
        outputs = []
        for req in touched.values():
            outputs.append(out.make_output(req))
            if req.finished:
                self.requests.pop(req.request_id, None)
                self._record_finished(req)
        if self._stats_logger is not None:
            self._stats_logger.maybe_log(self.stats)
        return outputs

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            kv_cache_usage=1.0 - bm.num_free_blocks / bm.num_blocks, num_preemptions=sched.num_preemptions,
            prompt_tokens=self.num_prompt_tokens_computed, generation_tokens=self.num_generation_tokens,
            prefix_cache_queries=bm.num_queried_blocks, prefix_cache_hits=bm.num_hit_blocks,
            spec_draft_tokens=self.num_spec_proposed, spec_accepted_tokens=self.num_spec_accepted,
            num_steps=self.num_steps)

    def _record_finished(self, req: Request) -> None:
        m = req.metrics
        self.finished.append(FinishedRequest(
            time_to_first_token=m.time_to_first_token, time_per_output_token=m.time_per_output_token,
            e2e_latency=(m.finished_time or m.arrival_time) - m.arrival_time,
            finish_reason=req.seqs[0].finish_reason or "abort", num_prompt_tokens=len(req.prompt_token_ids),
            num_generation_tokens=sum(s.num_output_tokens for s in req.seqs)))

    def _sampling_row(self, seq: Sequence, drafts: list[int] | None = None,
                      allowed: torch.Tensor | None = None) -> SamplingRow:
        """What the sampler needs of seq; drafts: the accepted tokens before this row (speculative verification);
        allowed: the structured-output mask."""
        out = seq.output_token_ids + (drafts or [])
        return SamplingRow(seq.params, seq.token_ids[: seq.num_prompt_tokens], out, seq.generator,
                           self.output_processor.banned_token_ids(seq.params), allowed)

    def _start_masks(self, seqs: list[Sequence]) -> Future | None:
        """Structured outputs: each sampling sequence's allowed tokens, computed in a thread while the model runs."""
        constrained = [s for s in seqs if s.matcher is not None]
        if not constrained:
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stablelm-fast-grammar")

        def compute() -> dict[int, torch.Tensor]:
            masks = self.structured.allowed_masks([s.matcher for s in constrained])
            return {s.seq_id: m for s, m in zip(constrained, masks)}
        return self._mask_pool.submit(compute)

    def _propose(self, seq: Sequence, num_running: int) -> list[int]:
        """n-gram drafts for a decoding sequence, within max_tokens and max_model_len (none in a large batch). With a
        draft model: as many placeholders as it may propose (the drafter fills them once the batch is scheduled)."""
        cfg = self.spec_config
        if cfg.disable_by_batch_size is not None and num_running > cfg.disable_by_batch_size:
            return []
        room = min(self.max_model_len - seq.num_tokens, (seq.params.max_tokens or 0) - seq.num_output_tokens) - 1
        if room < 1 or seq.matcher is not None:  # no drafts under a grammar
            return []
        if self.drafter is not None:
            return [0] * min(cfg.num_speculative_tokens, room)
        return ngram_propose(seq.token_ids, min(cfg.num_speculative_tokens, room), cfg.prompt_lookup_min,
                             cfg.prompt_lookup_max)

    def shutdown(self) -> None:
        if self._mask_pool is not None:
            self._mask_pool.shutdown(wait=False)
        if self.drafter is not None:
            self.drafter.shutdown()
        self.executor.shutdown()
