"""The wire format between the tensor-parallel driver (rank 0) and its workers: one command per control broadcast.

Each command is a fixed int64 header [cmd, args...] broadcast from rank 0; a STEP command is followed by one flat
int64 payload holding every tensor of the engine's StepInput (engine/step_input.py), so a step costs two broadcasts
whatever its size:

    header  [HEADER_LEN] int64: [CMD_STEP, T, B, max_blocks, S, is_decode, max_q_len, payload_len]
                                [CMD_ALLOC, num_blocks, block_size, 0...]
                                [CMD_STOP, 0...]
    payload [payload_len] int64: input_ids [T] | positions [T] | slot_mapping [T] | block_tables [B * max_blocks] |
                                 cu_seqlens_q [B + 1] | context_lens [B] | logits_indices [S]

Driver-only fields of a StepInput (sample_seqs, prompt_logprob_rows) are not sent: workers never sample.

A spawned worker (`python -m stablelm_fast.distributed.worker`) reads its spec as one JSON line on stdin, then keeps
stdin open as its lifeline (EOF: the driver is gone); it reports on a status pipe in JSON lines:
{"status": "loaded"} once its shard is loaded, {"status": "error", "text": traceback} before it exits on a failure.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from stablelm_fast.config import ModelConfig
from stablelm_fast.engine.step_input import StepInput

CMD_STEP, CMD_ALLOC, CMD_STOP = 1, 2, 3
HEADER_LEN = 8
PAYLOAD_LEN = HEADER_LEN - 1  # the header slot holding the payload's length (STEP commands)


def command_header(cmd: int, *args: int) -> torch.Tensor:
    """[HEADER_LEN] int64: cmd, then args, zero-padded."""
    if len(args) > HEADER_LEN - 1:
        raise ValueError(f"a command takes at most {HEADER_LEN - 1} arguments; got {len(args)}")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = cmd
    for i, a in enumerate(args):
        header[1 + i] = a
    return header


def encode_step(step: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (header [HEADER_LEN] int64, payload [N] int64) holding every tensor of the step."""
    b, max_blocks = step.block_tables.shape
    parts = [step.input_ids, step.positions, step.slot_mapping, step.block_tables.reshape(-1), step.cu_seqlens_q,
             step.context_lens, step.logits_indices]
    payload = torch.cat([p.to(torch.int64) for p in parts])
    header = command_header(CMD_STEP, step.input_ids.numel(), b, max_blocks, step.logits_indices.numel(),
                            int(step.is_decode), step.max_q_len, payload.numel())
    return header, payload


def decode_step(header: torch.Tensor, payload: torch.Tensor) -> StepInput:
    """The inverse of encode_step (on a worker: no sample_seqs / prompt_logprob_rows)."""
    _, t, b, max_blocks, s, is_decode, max_q_len, _ = (int(x) for x in header.tolist())
    sizes = [t, t, t, b * max_blocks, b + 1, b, s]
    ids, pos, slots, tables, cu, ctx, logits_idx = torch.split(payload, sizes)
    return StepInput(input_ids=ids, positions=pos, slot_mapping=slots,
                     block_tables=tables.reshape(b, max_blocks).to(torch.int32),
                     cu_seqlens_q=cu.to(torch.int32), context_lens=ctx.to(torch.int32), logits_indices=logits_idx,
                     is_decode=bool(is_decode), max_q_len=max_q_len)


# ---- a spawned worker's start-up spec and status lines -------------------------------------------------------------

def encode_worker_spec(rank: int, size: int, host: str, port: int, status_fd: int, runner_args: dict) -> bytes:
    """One JSON line: where to find the driver's TCPStore, the status pipe, and the ModelRunner's arguments."""
    args = dict(runner_args, config=dataclasses.asdict(runner_args["config"]),
                dtype=str(runner_args["dtype"]).removeprefix("torch."), device=str(runner_args["device"]))
    spec = dict(rank=rank, size=size, host=host, port=port, status_fd=status_fd, runner_args=args)
    return (json.dumps(spec) + "\n").encode("utf-8")


def decode_worker_spec(line: bytes) -> dict[str, Any]:
    """The inverse of encode_worker_spec: runner_args as ModelRunner takes them."""
    spec = json.loads(line)
    args = spec["runner_args"]
    dtype = getattr(torch, args["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"worker spec: unknown dtype {args['dtype']!r}")
    spec["runner_args"] = dict(args, config=ModelConfig(**args["config"]), dtype=dtype,
                               device=torch.device(args["device"]))
    return spec


def status_line(status: str, text: str | None = None) -> bytes:
    return (json.dumps({"status": status, "text": text}) + "\n").encode("utf-8")


def parse_status(line: bytes) -> tuple[str, str | None]:
    msg = json.loads(line)
    return msg["status"], msg.get("text")
