"""LLM: the offline API (vLLM's). Construct once, then generate() or chat() over batches of prompts."""

from __future__ import annotations

from typing import Any, Sequence as Seq

from stablelm_fast import tool_calls
from stablelm_fast.engine.llm_engine import EngineArgs, LLMEngine
from stablelm_fast.outputs import RequestOutput
from stablelm_fast.sampling_params import SamplingParams

PromptType = str | dict


class LLM:
    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", tensor_parallel_size: int = 1,
                 load_format: str = "auto", max_model_len: int | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory_gb: float | None = None,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, backend: str = "auto", seed: int = 0,
                 speculative_config: dict | None = None, disable_log_stats: bool = True,
                 quantization: str | None = None, quantization_config: dict | None = None) -> None:
        """quantization: 'int8' / 'int4' (quantized at load), 'gptq' / 'awq' / 'compressed-tensors' (pre-quantized
        checkpoints; also detected from config.json); quantization_config tunes int8 / int4
        (stablelm_fast/quantization/config.py)."""
        self.engine = LLMEngine(EngineArgs(
            model=model, dtype=dtype, device=device, tensor_parallel_size=tensor_parallel_size,
            load_format=load_format, max_model_len=max_model_len, block_size=block_size,
            num_kv_blocks=num_kv_blocks, kv_cache_memory_gb=kv_cache_memory_gb,
            enable_prefix_caching=enable_prefix_caching, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, backend=backend, seed=seed,
            speculative_config=speculative_config, disable_log_stats=disable_log_stats, quantization=quantization,
            quantization_config=quantization_config))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; returns RequestOutputs in input order. All prompts are validated first:
        a bad one raises ValueError before any work is scheduled."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        processed = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                processed.append(self.engine.input_processor.process(prompt, params))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids = [self.engine.add_request(p) for p in processed]
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, add_generation_prompt: bool = True, use_tqdm: bool = False,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template, then generate. tools (OpenAI's list): put
        in the system prompt in StableLM 2 12B Chat's format, as the server does (tool_calls.render_messages);
        parse a reply with tool_calls.parse_tool_calls."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            rendered = tool_calls.render_messages(list(conv), tools) if tools else list(conv)
            text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt,
                                                      **template_kwargs)
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(request_ids), desc="Processed prompts", unit="req")
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        final[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in pending:  # nothing is left behind in the engine
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[r] for r in request_ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
