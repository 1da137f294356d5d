"""Where the servers live: the weight-sync address and the GPU split of a launched deployment.

    .venv/bin/python -m pytest tests/test_rollout_deploy.py -q
"""
from __future__ import annotations

import socket

import pytest

from megafork.rollout.deploy import check_gpu_layout, resolve_master_addr
from megafork.train.config import ConfigError, load_config


def test_master_addr_is_detected_from_the_route_to_the_servers():
    assert resolve_master_addr("", ["http://127.0.0.1:30000"]) == "127.0.0.1"
    # A server elsewhere: the local source address of that route, never loopback (no packet is sent).
    remote = resolve_master_addr("", ["http://127.0.0.1:30000", "http://192.0.2.77:30000"])
    assert not remote.startswith("127."), remote
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.77", 30000))
        assert remote == s.getsockname()[0]
    assert resolve_master_addr(socket.gethostname(), ["http://192.0.2.77:1"]) == socket.gethostname()


@pytest.mark.parametrize("addr,why", [("no-such-host.invalid", "does not resolve"), ("0.0.0.0", "wildcard"),
                                       ("http://10.0.0.1", "expected a host name or IP address")])
def test_bad_master_addr_is_a_config_error(addr, why):
    with pytest.raises(ConfigError, match=rf"rollout.weight_sync_master_addr: .*{why}"):
        load_config(None, [f"rollout.weight_sync_master_addr={addr}"])


def test_master_addr_of_another_host_is_refused_on_rank_0():
    with pytest.raises(ValueError, match=r"rollout.weight_sync_master_addr: expected an address of trainer rank 0's "
                                         r"host .* found '192.0.2.77', which this host cannot listen on"):
        resolve_master_addr("192.0.2.77", ["http://127.0.0.1:30000"])


@pytest.mark.parametrize("key", ["weight_sync_port=70000", "weight_sync_timeout_s=0", "request_timeout_s=-1",
                                 "request_retries=-1", "sglang_launch_tp=0"])
def test_other_rollout_keys_are_range_checked(key):
    with pytest.raises(ConfigError, match=rf"rollout.{key.split('=')[0]}: expected"):
        load_config(None, [f"rollout.{key}"])


def test_a_launch_on_the_trainers_gpus_is_refused():
    # Recipe (b): trainer on GPUs 0-3, one SGLang server at TP=4 on GPUs 4-7.
    assert check_gpu_layout(4, base_gpu_id=4, num_servers=1, tp_size=4, device_count=8) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"GPUs \[2, 3\] would hold two NCCL ranks; expected "
                                         r"rollout.sglang_launch_base_gpu_id >= 4"):
        check_gpu_layout(4, base_gpu_id=2, num_servers=2, tp_size=2, device_count=8)
    with pytest.raises(ValueError, match=r"need GPUs \[4, 5, 6, 7, 8, 9, 10, 11\], but this node has 8"):
        check_gpu_layout(4, base_gpu_id=4, num_servers=2, tp_size=4, device_count=8)
    from megafork.train.setup import launch_config

    cfg = load_config(None, ["model.hf_path=/m", "rollout.engine=sglang", "rollout.sglang_launch=true",
                             "rollout.sglang_launch_tp=4", "rollout.sglang_launch_base_gpu_id=0"])
    with pytest.raises(ValueError, match=r"rollout.sglang_launch_base_gpu_id: .* GPUs \[0, 1, 2, 3\] would hold two"):
        launch_config(cfg, local_world_size=4)
    ok = load_config(None, ["model.hf_path=/m", "rollout.engine=sglang", "rollout.sglang_launch=true",
                            "rollout.sglang_launch_tp=4", "rollout.sglang_launch_base_gpu_id=4"])
    launch = launch_config(ok, local_world_size=4)
    assert launch.commands()[0][launch.commands()[0].index("--base-gpu-id") + 1] == "4"
    assert launch.model_path == "/m" and launch.urls() == ["http://127.0.0.1:30000"]


def test_launch_and_urls_together_is_a_config_error():
    with pytest.raises(ConfigError, match="rollout.sglang_urls: expected no URLs when rollout.sglang_launch=true"):
        load_config(None, ["rollout.engine=sglang", "rollout.sglang_launch=true", "rollout.sglang_urls=http://a:1"])
