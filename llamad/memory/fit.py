"""Fitting a model to the memory it can have: the context and the GPU layers llamad chooses.

What llama-server's `--fit` does at every start (common/fit.cpp), decided by llamad before
the start instead, since llamad knows what the other models hold and what stopping idle
ones would free (the scheduler hands that room in):

1. Context: when the arguments set none (no -c, or -c 0), the trained context if it fits,
   else the largest multiple of 256 tokens that does (of 256 x slots, without a unified
   KV cache), never below fit-min-ctx; ctx-max caps it.
2. Layers: when even that does not fit on the GPU and the arguments place nothing
   themselves (-ngl, -ot, --n-cpu-moe, --cpu-moe, -ts, -sm row), at the smallest context
   a mixture-of-experts model keeps the experts of its first layers in RAM (--n-cpu-moe,
   as few as it takes), then fewer layers go to the GPU (-ngl, as many as fit).

Pure: each candidate is priced by `Fitter.price` (the estimate, or what was learned for
exactly those arguments) and checked against a `Room`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from llamad.memory.types import Memory

STEP = 256  # llama.cpp rounds a fitted context down to this (CUDA's padding)
CTX, LAYERS, CPU_MOE = "--ctx-size", "--n-gpu-layers", "--n-cpu-moe"

Price = Callable[[tuple[str, ...]], Memory]


@dataclass(frozen=True)
class Room:
    """The memory a model may have: RAM, and VRAM on the GPU(s) it would go on."""

    ram: int
    vram: int = 0
    gpu: bool = False  # there are GPUs to place on; without, every byte counts as RAM

    def holds(self, need: Memory) -> bool:
        if not self.gpu:
            return need.ram + need.vram <= self.ram
        return need.ram <= self.ram and self.vram_holds(need.vram)

    def vram_holds(self, vram: int) -> bool:
        return vram == 0 or vram <= self.vram  # no VRAM: a CPU placement, GPUs full or not


@dataclass(frozen=True)
class Shape:
    """What fitting may change of one model."""

    trained: int  # the trained context of one sequence (n_ctx_train)
    most: int  # the largest context to choose: trained x streams, capped by ctx-max
    least: int  # the smallest: fit-min-ctx x streams (at most `most`)
    streams: int = 1  # KV streams: slots, when the cache is not unified
    fit_ctx: bool = True  # the arguments set no context
    layers: int = 0  # repeating layers that fitting may move off the GPU; 0: none
    experts: bool = False  # a mixture-of-experts model: its experts go to RAM first
    capped: bool = False  # `most` is ctx-max's, below the trained context


@dataclass(frozen=True)
class Choice:
    """What llamad adds to a model's arguments, and what the model then needs."""

    args: tuple[str, ...]
    need: Memory
    what: str = ""  # what was chosen, for people: "context 12288 of 131072"
    reason: str = ""  # `what` with the room it fitted in (the scheduler's words)
    ctx: int | None = None  # the context chosen; None: the arguments'

    def explained(self, room: str) -> Choice:
        why = f"{self.what}: {room}" if self.what else ""
        return Choice(self.args, self.need, self.what, why, self.ctx)


@dataclass(frozen=True)
class Fitter:
    """How a model may be fitted: what may change of it, and what each set of arguments needs."""

    shape: Shape
    price: Price = field(compare=False)
    # The part of each price a load cannot do without (less the file pages the kernel may
    # drop and read again: estimate.needs); None: all of it.
    floor: Price | None = field(default=None, compare=False)

    def choose(self, room: Room) -> Choice | None:
        """The plan to load with in this room, or None if nothing fits."""
        sh = self.shape
        found = self._context(room) if sh.fit_ctx else self._fixed(room)
        if found is not None or not sh.layers or not room.gpu:
            return found
        base = self._ctx_args(sh.least) if sh.fit_ctx else ()
        if sh.experts:
            found = self._experts(room, base)
            if found is not None:
                return found
            base = (*base, CPU_MOE, str(sh.layers))
        return self._layers(room, base)

    def relaxed(self, cpu: bool) -> Fitter | None:
        """The fitter for a model whose file pages do not all fit: each candidate priced
        by its floor. On the CPU the context stays the least: more would take the RAM the
        weights are already short of. None where there is no floor to price with."""
        if self.floor is None:
            return None
        sh = self.shape
        if cpu and sh.fit_ctx:
            sh = replace(sh, most=sh.least, capped=False)
        return Fitter(sh, self.floor)

    def restore(self, args: tuple[str, ...], reason: str) -> Choice:
        """The choice an earlier llamad made for a unit it started (the unit's environment)."""
        return Choice(args, self.price(args), self._what(args), reason, self._ctx(args))

    def least(self) -> Choice:
        """The smallest plan there is (every layer in RAM where fitting may move them), for
        the figures of a refusal."""
        sh = self.shape
        args = self._ctx_args(sh.least) if sh.fit_ctx else ()
        if sh.layers:
            args = (*args, LAYERS, "0")
        return Choice(args, self.price(args), self._what(args), ctx=self._ctx(args))

    # -- the steps --------------------------------------------------------------

    def _fixed(self, room: Room) -> Choice | None:
        need = self.price(())
        return Choice((), need) if room.holds(need) else None

    def _context(self, room: Room) -> Choice | None:
        sh = self.shape
        found = self._try(room, self._ctx_args(sh.most))
        if found is not None or sh.least >= sh.most:
            return found
        bottom = self._try(room, self._ctx_args(sh.least))
        if bottom is None:
            return None
        step = STEP * sh.streams  # llama.cpp keeps the context divisible by the streams
        k = _last(-(-sh.least // step), (sh.most - 1) // step,
                  lambda k: self._try(room, self._ctx_args(k * step)) is not None)
        return bottom if k is None else self._try(room, self._ctx_args(k * step))

    def _experts(self, room: Room, base: tuple[str, ...]) -> Choice | None:
        """The fewest layers whose experts must stay in RAM (VRAM falls as they grow)."""
        n = _first(1, self.shape.layers,
                   lambda k: self._vram_fits(room, (*base, CPU_MOE, str(k))))
        return None if n is None else self._try(room, (*base, CPU_MOE, str(n)))

    def _layers(self, room: Room, base: tuple[str, ...]) -> Choice | None:
        """The most layers on the GPU (VRAM grows with them, RAM falls)."""
        ngl = _last(0, self.shape.layers,
                    lambda k: self._vram_fits(room, (*base, LAYERS, str(k))))
        return None if ngl is None else self._try(room, (*base, LAYERS, str(ngl)))

    # -- helpers ----------------------------------------------------------------

    def _vram_fits(self, room: Room, args: tuple[str, ...]) -> bool:
        return room.vram_holds(self.price(args).vram)

    def _try(self, room: Room, args: tuple[str, ...]) -> Choice | None:
        need = self.price(args)
        if not room.holds(need):
            return None
        return Choice(args, need, self._what(args), ctx=self._ctx(args))

    def _ctx_args(self, ctx: int) -> tuple[str, ...]:
        # The trained context of one slot is what llama-server takes without -c: the
        # arguments stay as given (and so does what was learned for them).
        return () if ctx == self.shape.trained == self.shape.most else (CTX, str(ctx))

    def _ctx(self, args: tuple[str, ...]) -> int | None:
        if CTX in args:
            return int(args[args.index(CTX) + 1])
        return self.shape.most if self.shape.fit_ctx else None

    def _what(self, args: tuple[str, ...]) -> str:
        sh = self.shape
        parts = []
        ctx = self._ctx(args)
        if ctx is not None:
            slots = f" ({sh.streams} slots)" if sh.streams > 1 else ""
            trained = sh.trained * sh.streams
            if ctx == trained:
                parts.append(f"trained context {ctx}{slots}")
            else:
                cap = " (ctx-max)" if sh.capped and ctx == sh.most else ""
                parts.append(f"context {ctx}{cap}{slots} of {trained}")
        if CPU_MOE in args:
            n = args[args.index(CPU_MOE) + 1]
            parts.append(f"the experts of {n} of {sh.layers} layers in RAM")
        if LAYERS in args:
            parts.append(f"{args[args.index(LAYERS) + 1]} of {sh.layers + 1} layers on the GPU")
        return ", ".join(parts)


def _last(low: int, high: int, ok: Callable[[int], bool]) -> int | None:
    """The largest k in [low, high] with ok(k), for ok true then false; None if none."""
    if low > high or not ok(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if ok(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _first(low: int, high: int, ok: Callable[[int], bool]) -> int | None:
    """The smallest k in [low, high] with ok(k), for ok false then true; None if none."""
    if not ok(high):
        return None
    while low < high:
        mid = (low + high) // 2
        if ok(mid):
            high = mid
        else:
            low = mid + 1
    return low
