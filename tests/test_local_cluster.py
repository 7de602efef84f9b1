"""Local mode keeps to loopback, and starting it survives a slow machine.

* The local Ray that an embedded sweep starts listens on 127.0.0.1 only, Ray's node address
  included: the listening sockets of the sweep's processes are read from /proc while it runs
  (`listening_sockets`, `processes_of`). The check runs on the first sweep of
  tests/test_submit_embedded.py, which starts that Ray anyway; the same check on
  `scripts/local_cluster` is in tests/test_e2e_cluster.py, on its cluster.
* `worker.sweep._init_ray` retries a local start that timed out (Ray gives its raylet 30 s), after
  stopping what the failed start left running, and says so on stderr.

`listening_sockets` is shared with tests/test_e2e_cluster.py and tests/test_submit_embedded.py.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---- listening sockets, by process -----------------------------------------------------------


def _proc_net_listeners() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket (IPv4 and IPv6) of this netns."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[int(f[9])] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def processes_of(sessions: set[int] = frozenset(), marks: set[str] = frozenset(),
                 outputs_under: str | None = None) -> set[int]:
    """Live pids whose session id is in `sessions` (Ray's workers keep their node's session), whose
    environment holds one of `marks` (NAME=VALUE; Ray's job drivers start a session of their
    own), or whose stdout/stderr goes under `outputs_under` (a Ray session directory)."""
    wanted = {m.encode() for m in marks}
    pids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue  # dead, not yet reaped
            if os.getsid(pid) in sessions:
                pids.add(pid)
                continue
            if wanted and wanted & set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                pids.add(pid)
                continue
            if outputs_under and any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(outputs_under)
                                     for fd in (1, 2) if os.path.exists(f"/proc/{pid}/fd/{fd}")):
                pids.add(pid)
        except OSError:
            continue
    return pids


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, command) of every TCP socket in LISTEN state held by `pids`."""
    listeners = _proc_net_listeners()
    out = []
    for pid in sorted(pids):
        for inode in _socket_inodes(pid) & set(listeners):
            address, port = listeners[inode]
            out.append((address, port, pid, _cmd(pid)))
    return sorted(set(out), key=lambda s: (s[1], s[0]))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return ip.is_loopback


def not_loopback(sockets) -> list:
    return [s for s in sockets if not is_loopback(s[0])]


def test_listening_sockets_sees_a_known_listener():
    with socket.socket() as lo, socket.socket(socket.AF_INET6) as anyv6:
        lo.bind(("127.0.0.1", 0))
        lo.listen()
        anyv6.bind(("::", 0))
        anyv6.listen()
        mine = listening_sockets({os.getpid()})
        assert ("127.0.0.1", lo.getsockname()[1]) in {(a, p) for a, p, _, _ in mine}
        assert not_loopback(mine) == [s for s in mine if s[1] == anyv6.getsockname()[1]] != []
    assert is_loopback("::ffff:127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


# ---- _init_ray retries a start that timed out ------------------------------------------------


def test_init_ray_retries_a_local_start_that_timed_out(monkeypatch, capsys):
    import ray

    from worker import sweep

    calls, leftovers = [], []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            # What a start that timed out leaves behind: processes it had started.
            leftovers.append(subprocess.Popen(["sleep", "600"]))
            raise Exception("The current node timed out during startup. This could happen because "
                            "some of the raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    sleeps = []
    monkeypatch.setattr(sweep, "time", SimpleNamespace(sleep=sleeps.append))
    sweep._init_ray(num_cpus=2, first_delay_s=3.0)

    assert len(calls) == 2 and sleeps == [3.0]
    assert calls[1]["address"] == "local" and calls[1]["_node_ip_address"] == "127.0.0.1"
    assert leftovers[0].wait(timeout=15) is not None  # stopped before the retry
    err = capsys.readouterr().err
    assert "timed out (attempt 1 of 3)" in err and "retrying in 3 s" in err
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER  # restored: only the local start is kept on loopback


def test_init_ray_gives_up_after_its_attempts_and_never_retries_other_errors(monkeypatch):
    import ray

    from worker import sweep

    calls = []

    def timing_out(**kwargs):
        calls.append(kwargs)
        raise Exception("The current node timed out during startup.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timing_out)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    sleeps = []
    monkeypatch.setattr(sweep, "time", SimpleNamespace(sleep=sleeps.append))
    with pytest.raises(Exception, match="timed out during startup"):
        sweep._init_ray(attempts=3, first_delay_s=5.0)
    assert len(calls) == 3 and sleeps == [5.0, 10.0]

    calls.clear()

    def broken(**kwargs):
        calls.append(kwargs)
        raise ValueError("bad argument")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ValueError):
        sweep._init_ray()
    assert len(calls) == 1
