"""Multi-node training through the one launch path: 2 nodes x 1 process == 1 node x 2 processes.

Two torchrun agents (two "nodes" on 127.0.0.1, gloo on CPU) meet by c10d rendezvous — the same
command :func:`onerec_prod.train.launcher.launch_command` gives every pod of the PyTorchJob — and
run a few ZeRO-2 steps of the real SFT entry point; the weights must hash the same as the
single-node run with the same world size.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from onerec_prod.model.io import read_meta, weights_hash
from onerec_prod.train import day as train_cli
from onerec_prod.train import launcher
from tests.integration.test_train_sft import samples  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(2400)  # two ZeRO-2 runs; a loaded 2-core machine is slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_process_each_match_one_node_two_processes(make_cfg, tiny_model_dir, samples,  # noqa: F811
                                                                tmp_path, monkeypatch):
    monkeypatch.setattr(train_cli, "_champion", lambda c: None)
    common = [f"model.base_dir={tiny_model_dir}", "train.zero_stage=2", "train.max_steps=3",
              "train.save_steps=10", "train.per_device_batch_size=2"]
    data = samples("2014-01-01")

    one_node = make_cfg(*common, "train.nproc=2", "train.nnodes=1")
    ref = train_cli.train_stage(one_node, "2014-01-01", "warmup", tmp_path / "ref", tmp_path / "ref_work",
                                samples_path=data)

    # 2 nodes x 1 process: the launcher is asked for nnodes=2; each "node" is its own torchrun agent
    endpoint = f"127.0.0.1:{_free_port()}"
    two_nodes = make_cfg(*common, "train.nproc=1", "train.nnodes=2", "cluster.master_addr=127.0.0.1",
                         f"cluster.master_port={endpoint.rsplit(':', 1)[1]}")
    commands: list[list[str]] = []

    def launch_two_nodes(spec, spec_path, *, nproc, zero_stage, entry_module=launcher.ENTRY_MODULE,
                         nnodes=1, rdzv_endpoint=None, rdzv_id="onerec"):
        assert (nproc, nnodes, rdzv_endpoint) == (1, 2, endpoint)  # what train_day passes on
        path = launcher.write_spec(spec, spec_path)
        cmd = launcher.launch_command(path, nproc, zero_stage, entry_module, nnodes=nnodes,
                                      rdzv_endpoint=rdzv_endpoint, rdzv_id="test-2nodes")
        commands.append(cmd)
        env = launcher.worker_env(True)
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(nnodes)]
        outs = [p.communicate(timeout=2000)[0] for p in procs]
        for p, out in zip(procs, outs):
            if p.returncode != 0:
                raise launcher.LaunchError(p.returncode, out.splitlines(keepends=True))

    monkeypatch.setattr(launcher, "launch", launch_two_nodes)
    got = train_cli.train_stage(two_nodes, "2014-01-01", "warmup", tmp_path / "two", tmp_path / "two_work",
                                samples_path=data)

    cmd = commands[0]
    assert "--standalone" not in cmd and "--nnodes=2" in cmd and "--nproc_per_node=1" in cmd
    assert "--rdzv_backend=c10d" in cmd and f"--rdzv_endpoint={endpoint}" in cmd
    assert read_meta(got)["world_size"] == read_meta(ref)["world_size"] == 2
    assert read_meta(got)["global_step"] == read_meta(ref)["global_step"] == 3
    h_two, h_one = weights_hash(got), weights_hash(ref)
    print(f"weights sha256: 2 nodes x 1 process {h_two}; 1 node x 2 processes {h_one}")
    assert h_two == h_one
