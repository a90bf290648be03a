"""Tensor parallelism across two "hosts" joined by a real network link: two Linux network namespaces connected by a
veth pair, one `torchrun --nnodes 2` node in each, gloo over the veth (no loopback shortcut: each namespace sees only
its own lo and its end of the link). The driver's greedy tokens must equal a TP=1 run's.

This is what the README's multi-node section shows, with 10.213.7.1 / 10.213.7.2 standing for the two hosts.
Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2 (`apt-get install -y iproute2`); where namespaces cannot be
made (an unprivileged container, no `ip`) the test skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from stablelm_fast import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDR = ("10.213.7.1", "10.213.7.2")  # namespace-only addresses (no route outside the two namespaces)
PROMPTS = ["The quick brown fox", "StableLM is a family of", "def generate(prompt):"]
MAX_TOKENS = 12


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns_pair():
    """Two namespaces joined by a veth pair: yields [(ns, ifname, addr)] x 2; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 'ip' not found (apt-get install -y iproute2)")
    tag = f"{os.getpid() % 100000}"
    names = [(f"slf-n{i}-{tag}", f"slfv{i}-{tag}", ADDR[i]) for i in range(2)]
    made: list[str] = []
    try:
        for ns, _, _ in names:
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
            made.append(ns)
        (ns0, if0, a0), (ns1, if1, a1) = names
        steps = [("link", "add", if0, "type", "veth", "peer", "name", if1),
                 ("link", "set", if0, "netns", ns0), ("link", "set", if1, "netns", ns1)]
        for ns, ifname, addr in names:
            steps += [("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname), ("-n", ns, "link", "set", ifname, "up"),
                      ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"cannot set up the veth link (needs CAP_NET_ADMIN): ip {' '.join(step)}: "
                            f"{r.stderr.strip()}")
        yield names
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # deleting a namespace deletes its veth end, and so the pair


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_namespaces_torchrun_matches_tp1(netns_pair, tiny_model, tmp_path):
    (ns0, if0, a0), (ns1, if1, a1) = netns_pair
    r = _ip("netns", "exec", ns1, "ping", "-c", "1", "-W", "2", a0) if shutil.which("ping") else None
    assert r is None or r.returncode == 0, f"no link between the namespaces: {r.stdout} {r.stderr}"
    port = _free_port()  # only needs to be free inside ns0, which starts empty
    out_json = tmp_path / "tp2.json"
    procs = []
    for rank, (ns, ifname, _) in enumerate(netns_pair):
        env = dict(os.environ, PYTHONPATH=ROOT, GLOO_SOCKET_IFNAME=ifname, OMP_NUM_THREADS="1",
                   TORCHELASTIC_ERROR_FILE=str(tmp_path / f"err{rank}.json"))
        env.pop("TRITON_INTERPRET", None)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
               "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
               "--master-addr", a0, "--master-port", str(port),
               "-m", "stablelm_fast.distributed.launch", tiny_model,
               "--device", "cpu", "--dtype", "float32", "--max-tokens", str(MAX_TOKENS)]
        if rank == 0:
            cmd += [a for p in PROMPTS for a in ("--prompt", p)] + ["--output-json", str(out_json)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank} exited {p.returncode}:\n{log[-4000:]}"
    got = json.loads(out_json.read_text())

    llm = LLM(tiny_model, device="cpu", dtype="float32")
    want = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert [g["prompt"] for g in got] == PROMPTS
    for g, w in zip(got, want):
        assert g["token_ids"] == list(w.outputs[0].token_ids), g["prompt"]
        assert g["text"] == w.outputs[0].text
