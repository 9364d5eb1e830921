"""The one owner of model state: carries out the scheduler's decisions through systemd.

Assembled from one layer per concern, each a subclass of the one below it, all sharing
the same Slots and changing a model's state only through `Core.move`:

- core.py: the slots, `move`, views, supervised background tasks;
- lifecycle.py: decisions carried out: starting, /health, stopping, adoption, TTLs;
- admission.py: requests: names, queue bounds, holding a model for one request;
- reconcile.py: systemd's own view of the units, compared and repaired periodically;
- unitsignals.py: systemd's signals about model units;
- liveness.py: wedged backends (probed every tick, or reported by forwarding) restarted;
- sleeping.py: models that llama-server put to sleep when idle (--sleep-idle-seconds);
- idle.py: idle TTLs handed to systemd timers while llamad is away (idle-exit).
"""

from __future__ import annotations

from typing import Any

from llamad.supervisor.core import IllegalMove
from llamad.supervisor.guards import comeback, gpuload, kvcache, rpcguard
from llamad.supervisor.idle import Idle

__all__ = ["IllegalMove", "Supervisor"]


class Supervisor(Idle):
    """All of the above; what app.py builds and the HTTP handlers use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gpu = gpuload.GpuGuard(self)  # GPU out-of-memory retries, CPU fallback checks
        self.kv = kvcache.KvCache(self)  # KV caches kept across swaps
        self.rpc = rpcguard.RpcGuard(self)  # RPC workers that go away or are busy
        self.comeback = comeback.Comeback(self)  # restore = yes: back once there is room
        # The order they are called in: the RPC check refuses a request before anything
        # else runs; the GPU wait comes before a start, the KV restore before serving.
        self.hooks = (self.rpc, self.comeback, self.gpu, self.kv)
