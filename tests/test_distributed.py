"""Many devices and many processes, simulated on the CPU in subprocesses."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

import jax
from rfdit.distributed import make_mesh, param_spec

SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"


def last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def test_eight_devices_match_one():
    # the device count must be fixed before JAX starts, so the checks run in their own process
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "mesh_checks.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = last_json(proc.stdout)
    assert r["dp_vs_single"] < 1e-5 and r["fsdp_vs_single"] < 1e-5  # data-parallel and FSDP steps
    assert r["fsdp_sharded_leaves"] > 0 and r["fsdp_still_sharded"]
    assert r["bf16_dp_vs_single"] < 1e-5 and r["bf16_fsdp_vs_single"] < 1e-5  # bf16 products on the mesh too
    # two Adam steps of lr 1e-3 move the parameters by ~1e-3 relative; bf16 rounding changes them by far less
    assert 0 < r["bf16_vs_float32"] < 1e-4
    assert r["grad_accum_vs_big_batch"] < 1e-5
    assert r["sample_fixed_vs_single"] < 1e-5 and r["sample_is_sharded"]
    assert r["sample_adaptive_max_abs"] < 1e-3  # sharded error norms may flip step decisions: solver tolerance
    assert r["restored_on_one_device"] and r["restored_vs_saved"] == 0.0
    assert r["continue_1_vs_8"] < 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_data_and_agree():
    port = str(free_port())
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "two_process.py"), port, str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    a, b = (last_json(out) for out, _ in outputs)
    assert not set(a["seen"]) & set(b["seen"])  # each process reads its own share
    assert len(a["seen"]) == len(b["seen"]) == 3 * 16
    assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-7) and a["loss"] == b["loss"]


def test_param_spec_rule():
    assert param_spec((64, 32), 1) == jax.sharding.PartitionSpec()
    assert param_spec((64, 32), 4) == jax.sharding.PartitionSpec("fsdp", None)
    assert param_spec((3, 5), 4) == jax.sharding.PartitionSpec()  # nothing divides: replicated
    with pytest.raises(ValueError, match="must divide the device count"):
        make_mesh(fsdp=3, devices=jax.devices() * 2)
