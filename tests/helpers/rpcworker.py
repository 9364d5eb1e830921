"""A llama.cpp RPC worker host for tests and benchmarks: a box of its own running the
shipped units/llamad-rpc-worker.service (the file the llamad-rpc-worker package installs),
configured by a drop-in as an admin would, on a loopback address of its own."""

from __future__ import annotations

import socket
from pathlib import Path

import rig

from helpers.ports import free_port

UNIT = "llamad-rpc-worker.service"
SHIPPED = Path(__file__).resolve().parents[2] / "units" / UNIT


class RpcWorker:
    """ggml-rpc-server on `host` in `box`, letting in `peer` (the llamad host's address as
    the worker sees it: on loopback, llama-server connects from 127.0.0.1)."""

    def __init__(self, box: rig.Box, host: str = "127.0.0.3", peer: str = "127.0.0.1",
                 threads: int = 1) -> None:
        self.box = box
        self.host = host
        self.port = free_port(host)
        binary = rig.Assets(box.workdir)._link(rig.RPC_SERVER, "ggml-rpc-server")
        # Where the unit looks for it (systemd's search path), in the box's own /usr/local.
        box.run(["install", "-m", "0755", str(binary), "/usr/local/bin/ggml-rpc-server"])
        box.run(["cp", str(SHIPPED), f"/etc/systemd/system/{UNIT}"])
        dropin = Path(f"/etc/systemd/system/{UNIT}.d")
        box.run(["mkdir", "-p", str(dropin)])
        box.run(["tee", str(dropin / "address.conf")], input=(
            "[Service]\n"
            f"Environment=RPC_HOST={host} RPC_PORT={self.port} RPC_THREADS={threads}\n"
            f"IPAddressAllow={peer}\n"))
        box.run(["systemctl", "daemon-reload"])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.box.run(["systemctl", "start", UNIT])
        rig.wait_for(f"the rpc worker on {self.address}", self.answers, timeout=30)

    def stop(self) -> None:
        self.box.run(["systemctl", "stop", UNIT])

    def answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def rss(self) -> int:
        """Resident bytes of the worker process now (0 when it is not running)."""
        pid = self.box.run(["systemctl", "show", "-P", "MainPID", UNIT]).stdout.strip()
        if pid in ("", "0"):
            return 0
        status = self.box.run(["cat", f"/proc/{pid}/status"], check=False).stdout
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def journal(self) -> str:
        return self.box.journal("-u", UNIT)
