"""The tensor-parallel pieces that need no second process: the wire format and how a worker's end is described."""

from __future__ import annotations

import pytest
import torch

from stablelm_fast.distributed.monitor import describe_exit, format_exception
from stablelm_fast.config import ModelConfig
from stablelm_fast.distributed.protocol import (CMD_ALLOC, CMD_STEP, HEADER_LEN, PAYLOAD_LEN, command_header,
                                                decode_step, decode_worker_spec, encode_step, encode_worker_spec,
                                                parse_status, status_line)
from stablelm_fast.engine.step_input import StepInput
from stablelm_fast.tiny import TINY_CONFIGS, make_tiny_checkpoint


def _step(is_decode: bool) -> StepInput:
    g = torch.Generator().manual_seed(0)
    t, b, max_blocks = (3, 3, 2) if is_decode else (11, 2, 3)
    cu = torch.tensor([0, 1, 2, 3] if is_decode else [0, 4, 11], dtype=torch.int32)
    return StepInput(input_ids=torch.randint(0, 1000, (t,), generator=g), positions=torch.arange(t) + 5,
                     slot_mapping=torch.randint(0, 64, (t,), generator=g),
                     block_tables=torch.randint(0, 16, (b, max_blocks), generator=g, dtype=torch.int32),
                     cu_seqlens_q=cu, context_lens=torch.randint(1, 40, (b,), generator=g, dtype=torch.int32),
                     logits_indices=cu[1:].to(torch.int64) - 1, is_decode=is_decode,
                     max_q_len=int((cu[1:] - cu[:-1]).max()), sample_seqs=list(range(b)))


@pytest.mark.parametrize("is_decode", [False, True])
def test_step_round_trip(is_decode):
    step = _step(is_decode)
    header, payload = encode_step(step)
    assert header.shape == (HEADER_LEN,) and header.dtype == payload.dtype == torch.int64
    assert int(header[0]) == CMD_STEP and int(header[PAYLOAD_LEN]) == payload.numel()
    got = decode_step(header.clone(), payload.clone())
    for a, b in zip(step.tensors(), got.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert (got.is_decode, got.max_q_len) == (step.is_decode, step.max_q_len)
    assert got.sample_seqs == [] and got.prompt_logprob_rows == []  # driver-only: not sent


def test_command_header():
    assert command_header(CMD_ALLOC, 24, 16).tolist() == [CMD_ALLOC, 24, 16] + [0] * (HEADER_LEN - 3)
    with pytest.raises(ValueError, match="at most"):
        command_header(CMD_ALLOC, *range(HEADER_LEN))


def test_describe_exit():
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-9) == "was killed by signal SIGKILL"
    assert describe_exit(None) == "is gone"
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        text = format_exception(e)
    assert text.startswith("Traceback") and text.endswith("RuntimeError: boom")


@pytest.mark.parametrize("variant", list(TINY_CONFIGS))
def test_worker_spec_round_trip(tmp_path, variant):
    path = make_tiny_checkpoint(str(tmp_path), variant)
    args = dict(config=ModelConfig.from_pretrained(path), model_dir=path, load_format="auto", dtype=torch.bfloat16,
                device=torch.device("cpu"), backend="torch", seed=7)
    line = encode_worker_spec(1, 2, "127.0.0.1", 29500, 9, args)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line on the worker's stdin
    spec = decode_worker_spec(line)
    assert (spec["rank"], spec["size"], spec["host"], spec["port"], spec["status_fd"]) == (1, 2, "127.0.0.1", 29500, 9)
    assert spec["runner_args"] == args
    with pytest.raises(ValueError, match="dtype"):
        decode_worker_spec(line.replace(b'"bfloat16"', b'"Tensor"'))


def test_status_lines():
    assert parse_status(status_line("loaded")) == ("loaded", None)
    text = "Traceback (most recent call last):\n  ...\nRuntimeError: boom \u2014 \"quoted\""
    line = status_line("error", text)
    assert line.count(b"\n") == 1 and parse_status(line) == ("error", text)
