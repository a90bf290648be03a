"""LLMEngine: the synchronous engine loop. step() = schedule -> run the model -> sample -> postprocess.

Used directly by `LLM` (offline batches) and from the engine thread of `AsyncLLM` (servers).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from stablelm_fast.config import ModelConfig, resolve_dtype
from stablelm_fast.engine.block_manager import BlockManager
from stablelm_fast.engine.model_runner import ModelRunner, default_num_blocks, prepare_step
from stablelm_fast.engine.scheduler import Scheduler
from stablelm_fast.engine.sequence import Sequence
from stablelm_fast.layers.sampler import Sampler, SamplingRow
from stablelm_fast.ops import resolve_backend
from stablelm_fast.outputs import CompletionOutput, RequestMetrics, RequestOutput
from stablelm_fast.sampling_params import SamplingParams
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


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 seqs: list[Sequence], arrival_time: float) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.params, self.seqs = params, seqs
        self.metrics = RequestMetrics(arrival_time=arrival_time)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        args.validate()
        self.args = args
        self.config = ModelConfig.from_pretrained(args.model)
        self.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if args.device == "auto" else args.device))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        self.dtype = resolve_dtype(args.dtype, self.config, self.device)
        self.backend = resolve_backend(args.backend, self.device)
        self.max_model_len = args.max_model_len or self.config.max_position_embeddings
        if not 1 <= self.max_model_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_model_len must be in [1, {self.config.max_position_embeddings}] "
                             f"(max_position_embeddings); got {self.max_model_len}")
        self.tokenizer = Tokenizer(args.model, self.config.eos_token_id)
        model_dir = None if args.load_format == "dummy" else args.model
        if args.tensor_parallel_size > 1:
            from stablelm_fast.distributed.executor import TPExecutor
            self.executor = TPExecutor(self.config, model_dir, args.load_format, self.dtype, self.device,
                                       self.backend, args.tensor_parallel_size, args.seed)
        else:
            self.executor = ModelRunner(self.config, model_dir, args.load_format, self.dtype, self.device,
                                        self.backend, seed=args.seed)
        num_blocks = args.num_kv_blocks or default_num_blocks(
            self.executor.kv_bytes_per_block(args.block_size), args.block_size, self.max_model_len,
            args.max_num_seqs, self.device, args.kv_cache_memory_gb)
        self.executor.allocate_kv_cache(num_blocks, args.block_size)
        if self.device.type == "cuda" and isinstance(self.executor, ModelRunner):
            self.executor.enable_cuda_graphs(args.max_num_seqs, -(-self.max_model_len // args.block_size))
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        max_batched = args.max_num_batched_tokens or max(self.max_model_len, 2048)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, max_batched)
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self._seq_to_request: dict[int, _Request] = {}
        self._next_id = 0
        self.num_steps = 0
        self.num_prompt_tokens_computed = 0
        torch.manual_seed(args.seed)

    # ---- requests --------------------------------------------------------------------------------------------------

    def validate_prompt(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        else:
            raise ValueError("a prompt must be a string or a dict with 'prompt_token_ids' (or 'prompt')")
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        if len(ids) == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        return text, list(ids)

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        max_tokens = params.max_tokens or 1
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is longer than "
                             f"max_model_len ({self.max_model_len})")
        blocks = -(-(num_prompt_tokens + max_tokens) // self.block_manager.block_size)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"the prompt plus max_tokens needs {blocks} KV-cache blocks but the cache has only "
                             f"{self.block_manager.num_blocks}: raise num_kv_blocks / kv_cache_memory_gb")

    def add_request(self, prompt: str | dict | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Validate and queue a request. Raises ValueError (and queues nothing) on bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        text, ids = self.validate_prompt(prompt)
        self.check_fits(len(ids), params)
        if params.max_tokens is None:
            params = _with_max_tokens(params, self.max_model_len - len(ids))
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        now = arrival_time or time.monotonic()
        seqs = [Sequence(request_id, i, ids, params, self.tokenizer, now) for i in range(params.n)]
        req = _Request(request_id, text, ids, params, seqs, now)
        self.requests[request_id] = req
        for seq in seqs:
            self._seq_to_request[seq.seq_id] = req
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
            self._seq_to_request.pop(seq.seq_id, None)
        return self._make_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the loop --------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the outputs of every request that made progress (finished ones last seen)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        step = prepare_step(batch, self.block_manager.block_size)
        try:
            logits = self.executor.execute(step)
        except Exception:
            # NOTE: blocks this step was writing were already published to the prefix cache; forget them all.
            self.block_manager.reset_prefix_cache()
            raise
        self.num_steps += 1
        sampling_seqs = [s for s, n in zip(batch.seqs, batch.num_new_tokens)
                         if s.num_computed_tokens + n == s.num_tokens]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.num_prompt_tokens_computed += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
        touched: dict[str, _Request] = {}
        if sampling_seqs:
            rows = [SamplingRow(s.params, s.token_ids[: s.num_prompt_tokens], s.output_token_ids, s.generator,
                                self._banned(s.params)) for s in sampling_seqs]
            tokens, logprobs = self.sampler(logits, rows)
            now = time.monotonic()
            for seq, token, lp in zip(sampling_seqs, tokens, logprobs):
                self._append_token(seq, token, lp, now)
                touched[seq.request_id] = self._seq_to_request[seq.seq_id]
        outputs = []
        for req in touched.values():
            out = self._make_output(req)
            if req.finished:
                req.metrics.finished_time = time.monotonic()
                self.requests.pop(req.request_id, None)
                for seq in req.seqs:
                    self._seq_to_request.pop(seq.seq_id, None)
            outputs.append(out)
        return outputs

    def _banned(self, params: SamplingParams) -> list[int]:
        if params.min_tokens == 0:
            return []
        banned = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            banned |= self.tokenizer.eos_token_ids
        return sorted(banned)

    def _append_token(self, seq: Sequence, token: int, logprobs: dict[int, float] | None, now: float) -> None:
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
            req = self._seq_to_request[seq.seq_id]
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        prev_len = len(seq.text)
        if seq.detokenizer is not None:
            seq.detokenizer.add(token)
            seq.text = seq.detokenizer.text
        num_out = seq.num_output_tokens
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
                return self._finish(seq, "stop", token, strip_token=True)
            if p.stop_token_ids and token in p.stop_token_ids:
                return self._finish(seq, "stop", token, strip_token=True)
            if p.stop_strings:
                # only the tail can hold a new match: the new text and the longest stop string before it
                start = max(0, prev_len - max(len(s) for s in p.stop_strings))
                for stop in p.stop_strings:
                    at = seq.text.find(stop, start)
                    if at != -1:
                        seq.text = seq.text[:at]
                        return self._finish(seq, "stop", stop)
        if num_out >= (p.max_tokens or 0) or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None, strip_token: bool = False) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.detokenizer is not None and not isinstance(stop_reason, str):
            # final text: flush a trailing partial character; the eos / stop token itself is not part of the text
            # (it is kept in token_ids, as vLLM does). A stop string already cut the text.
            ids = seq.output_token_ids[:-1] if strip_token else seq.output_token_ids
            seq.text = self.tokenizer.decode(ids, seq.params.skip_special_tokens)
        self.scheduler.finish(seq)

    def _make_output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.text
            if not seq.is_finished and seq.params.stop_strings:
                # NOTE: hold back a possible partial stop string so that streamed text is never taken back.
                hold = max(len(s) for s in seq.params.stop_strings) - 1
                text = text[: max(0, len(text) - hold)]
            outs.append(CompletionOutput(index=seq.index, text=text, token_ids=list(seq.output_token_ids),
                                         finish_reason=seq.finish_reason,
                                         logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                                         stop_reason=seq.stop_reason))
        req.metrics.num_output_tokens = max(s.num_output_tokens for s in req.seqs)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=outs, finished=req.finished, metrics=req.metrics,
                             num_cached_tokens=max(s.num_cached_prompt_tokens for s in req.seqs))

    def shutdown(self) -> None:
        if hasattr(self.executor, "shutdown"):
            self.executor.shutdown()


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=max_tokens)
