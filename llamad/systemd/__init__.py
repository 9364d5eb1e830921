"""Everything that speaks systemd: D-Bus calls and signals, unit names, exit statuses,
socket activation. Imports only the foundation.

llamad uses pystemd's D-Bus binding alone (`pystemd.dbuslib`, in bus.py). The package's own
`__init__` imports its object layer, and with it lxml for D-Bus introspection, which llamad
never uses: 4-5 MB of llamad's idle memory and tens of ms of every start, socket-activated
ones included. So, unless something imported pystemd already, the package is registered
here without running its `__init__`; its submodules import as usual.
"""

from __future__ import annotations

import importlib.util
import sys


def _bare_pystemd() -> None:
    if "pystemd" in sys.modules:
        return
    spec = importlib.util.find_spec("pystemd")
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules["pystemd"] = importlib.util.module_from_spec(spec)


_bare_pystemd()
