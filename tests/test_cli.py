"""The `stablelm-fast` command (python -m stablelm_fast)."""

import os
import subprocess
import sys

import pytest

from stablelm_fast.cli import build_parser, main
from stablelm_fast.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("server")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_FLAGS = ["--dtype", "--device", "--tensor-parallel-size", "--load-format", "--max-model-len", "--block-size",
                "--num-kv-blocks", "--kv-cache-memory-gb", "--no-enable-prefix-caching", "--max-num-seqs",
                "--max-num-batched-tokens", "--backend", "--seed"]


def _run(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "stablelm_fast", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def test_help_mentions_every_flag():
    top = _run("--help")
    assert top.returncode == 0
    for cmd in ("generate", "chat", "serve", "bench"):
        assert cmd in top.stdout
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    for cmd in ("generate", "chat", "serve"):
        text = subs[cmd].format_help()
        for flag in ENGINE_FLAGS:
            assert flag in text, (cmd, flag)
    serve = subs["serve"].format_help()
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "127.0.0.1"):
        assert flag in serve
    # every option has a help text
    for cmd, sub in subs.items():
        for action in sub._actions:
            assert action.help, (cmd, action.dest)
    assert "latency" in subs["bench"].format_help() and "throughput" in subs["bench"].format_help()


def test_generate_prints_text(tmp_path):
    model = make_tiny_checkpoint(str(tmp_path / "tiny"), "stablelm-2-1_6b")
    r = _run("generate", model, "--prompt", "Hello, world", "--max-tokens", "5", "--temperature", "0",
             "--dtype", "float32", "--backend", "torch", "--num-kv-blocks", "64")
    assert r.returncode == 0, r.stderr
    assert "Hello, world" in r.stdout and "5 tokens" in r.stdout


def test_bad_flag_values_are_reported(capsys):
    assert main(["generate", "/nonexistent", "--prompt", "Hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "/nonexistent", "--prompt", "Hi", "--dtype", "float8"])


def test_chat_reads_until_exit(tmp_path):
    model = make_tiny_checkpoint(str(tmp_path / "tiny"), "stablelm-2-12b")
    r = _run("chat", model, "--max-tokens", "4", "--dtype", "float32", "--backend", "torch",
             input="Hi there\n/reset\nHow are you?\nexit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # the streamed replies (random words: the weights are random)


def test_bench_model_argument_style(tmp_path):
    from stablelm_fast.cli import _model_argv
    cases = {'p.add_argument("model", nargs="?")': ["M"],
             "p.add_argument('--model-dir', default=X)": ["--model-dir", "M"],
             'ap.add_argument("--model")': ["--model", "M"], "print('no args')": ["M"]}
    for source, expected in cases.items():
        script = tmp_path / "b.py"
        script.write_text(source)
        assert _model_argv(str(script), "M") == expected
