"""The one owner of model state: carries out the scheduler's decisions through systemd.

Assembled from one layer per concern, each a subclass of the one below it, all sharing
the same Slots and changing a model's state only through `Core.move`:

- core.py: the slots, `move`, views, supervised background tasks;
- lifecycle.py: decisions carried out: starting, /health, stopping, adoption, TTLs;
- admission.py: requests: names, queue bounds, holding a model for one request;
- unitsignals.py: systemd's signals about model units.
"""

from __future__ import annotations

from llamad.core import IllegalMove
from llamad.unitsignals import Signals

__all__ = ["IllegalMove", "Supervisor"]


class Supervisor(Signals):
    """All of the above; what app.py builds and the HTTP handlers use."""
