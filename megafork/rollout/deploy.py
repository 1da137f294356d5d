"""Where the rollout servers live relative to the trainer: the weight-sync address and GPU layout.

    addr = resolve_master_addr("", ["http://10.0.0.5:30000"])   # "" -> the local address routing to 10.0.0.5
    check_gpu_layout(trainer_gpus=4, base_gpu_id=4, num_servers=1, tp_size=4)   # GPUs 4-7; 0-3 would be refused

The weight-update group's TCP store listens on trainer rank 0; every SGLang server connects to
`master_address`, so it must be an address of rank 0's host that the servers can route to. The
default is detected per run: the source address the kernel picks to reach the first server (a
loopback address only when the servers are on rank 0's host themselves).
"""
from __future__ import annotations

import ipaddress
import socket
import urllib.parse


def check_master_addr(addr: str, key: str = "rollout.weight_sync_master_addr") -> str:
    """Check that `addr` is a usable host name or IP (resolvable, not a wildcard); returns it.

    Raises:
        ValueError: naming `key`, what was expected and what was found.
    """
    if not isinstance(addr, str) or not addr.strip() or any(c in addr for c in " /:@") and not _is_ipv6(addr):
        raise ValueError(f"{key}: expected a host name or IP address of trainer rank 0, found {addr!r}")
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"{key}: expected a resolvable host name or IP address of trainer rank 0, "
                         f"found {addr!r}, which does not resolve ({exc})") from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if ip.is_unspecified:
            raise ValueError(f"{key}: expected an address the servers can connect to, found the wildcard {addr!r}")
    return addr


def check_local_addr(addr: str, key: str = "rollout.weight_sync_master_addr") -> None:
    """Check that `addr` belongs to this host (rank 0 listens on it), by binding a socket to it."""
    check_master_addr(addr, key)
    family = socket.AF_INET6 if _is_ipv6(addr) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
    except OSError as exc:
        raise ValueError(f"{key}: expected an address of trainer rank 0's host ({socket.gethostname()}), found "
                         f"{addr!r}, which this host cannot listen on ({exc})") from exc


def resolve_master_addr(addr: str, urls: list[str]) -> str:
    """The weight-sync master address: `addr` if given (checked), else detected from the server URLs.

    Args:
        addr: `rollout.weight_sync_master_addr` ("" = detect).
        urls: the SGLang server URLs.
    """
    if addr:
        check_local_addr(addr)
        return addr
    found = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        try:
            family = socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family[0], socket.SOCK_DGRAM) as s:
                s.connect(family[4])  # UDP connect sends nothing; it only picks the route and source address
                found.append(s.getsockname()[0])
        except OSError:
            continue
    # A remote server's route wins over a local one: the remote server cannot reach loopback.
    remote = [a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if remote:
        return remote[0]
    if found:
        return found[0]
    return socket.gethostbyname(socket.gethostname())


def check_gpu_layout(trainer_gpus: int, base_gpu_id: int, num_servers: int, tp_size: int,
                     device_count: int | None = None) -> list[int]:
    """Refuse a launch layout that would put SGLang on the trainer's GPUs (two NCCL ranks on one GPU).

    Args:
        trainer_gpus: trainer ranks on this node; they use GPUs 0 .. trainer_gpus - 1.
        base_gpu_id, num_servers, tp_size: the launched servers use GPUs
            base_gpu_id .. base_gpu_id + num_servers * tp_size - 1.
        device_count: GPUs on the node, when known.

    Returns:
        The GPU ids of the launched servers.
    """
    servers = list(range(base_gpu_id, base_gpu_id + num_servers * tp_size))
    overlap = sorted(set(servers) & set(range(trainer_gpus)))
    if overlap:
        raise ValueError(
            f"rollout.sglang_launch_base_gpu_id: {num_servers} server(s) x tp {tp_size} from GPU {base_gpu_id} would use "
            f"GPUs {servers}, but the trainer's {trainer_gpus} ranks on this node use GPUs {list(range(trainer_gpus))}: "
            f"GPUs {overlap} would hold two NCCL ranks; expected rollout.sglang_launch_base_gpu_id >= {trainer_gpus}")
    if device_count is not None and servers and servers[-1] >= device_count:
        raise ValueError(f"rollout.sglang_launch_base_gpu_id: the launched servers need GPUs {servers}, "
                         f"but this node has {device_count}")
    return servers


def _is_ipv6(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).version == 6
    except ValueError:
        return False
