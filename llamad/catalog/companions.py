"""The files a model loads besides its own, for its memory estimate: a projector a preset
names (`mmproj =`) and a draft model (`--model-draft`, from a preset or a sidecar).

Read through the header cache; one that cannot be read now gives None, and the estimate
goes without it (llama-server says why it cannot load it when it starts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from llamad.catalog import argv
from llamad.catalog.gguf_info import FileHeader, GGUFError, GGUFInfo, InfoCache, Projector, combine
from llamad.catalog.presets import DRAFT

T = TypeVar("T")


Confine = Callable[[Path], None] | None  # files.confine for the scan's directories


def projector(path: Path, cache: InfoCache, confine: Confine = None) -> Projector | None:
    return _read(path, cache, Projector.of, confine)


def draft(args: Sequence[str], cache: InfoCache, confine: Confine = None) -> GGUFInfo | None:
    path = _draft_path(args)
    return _read(path, cache, lambda h: combine([h], None), confine) if path else None


def paths(mmproj: Path | None, args: Sequence[str]) -> list[Path]:
    """The companion files of a model, which the header cache keeps."""
    return [p for p in (mmproj, _draft_path(args)) if p is not None]


def _draft_path(args: Sequence[str]) -> Path | None:
    option = argv.last(args, DRAFT)
    return Path(option.value) if option is not None and option.value else None


def _read(path: Path, cache: InfoCache, make: Callable[[FileHeader], T],
          confine: Confine) -> T | None:
    try:
        return make(cache.header(path, confine=confine))
    except (OSError, GGUFError):
        return None
