"""What a model's unit looks like: command line, address, limits, and the
environment by which a later llamad recognizes it. Pure functions of config and catalog."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from llamad import sizes
from llamad.catalog import argv as args
from llamad.catalog import rpcargs as rpc
from llamad.catalog.catalog import Model
from llamad.config import Config
from llamad.memory import fit as fitting
from llamad.memory.fit import Choice
from llamad.memory.gpu import mem_total
from llamad.safetext import one_line
from llamad.supervisor import backend as be
from llamad.supervisor.guards import gpuload, kvcache
from llamad.systemd.unitname import instance_of
from llamad.systemd.units import Markers, UnitSpec, UnitStatus


def instance(model: Model) -> str:
    return instance_of(model.unit)


def address(config: Config, model: Model, port: int = 0) -> str:
    """Where the model's backend listens: its UNIX socket, or the loopback `port` llamad
    allocated to it (0 until it has one)."""
    if config.backend == "unix":
        return be.unix_address(config.run_dir, instance(model))
    return be.tcp_address(port)


def tcp_port(address: str) -> int | None:
    """The port of a loopback TCP backend address, None for anything else."""
    kind, _, rest = address.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or host != "127.0.0.1" or not port.isdigit():
        return None
    return int(port)


UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def memory_max_props(text: str) -> list[tuple[str, bytes, int]]:
    """D-Bus properties for a systemd MemoryMax= value ('16G', '75%', 'infinity', bytes),
    as `systemctl set-property` sends them; config.py has checked the syntax."""
    text = text.strip()
    if text == "infinity":
        return [("MemoryMax", b"t", UINT64_MAX)]
    if text.endswith("%"):
        # systemd's scale: a fraction of the machine's memory in units of 1/UINT32_MAX.
        return [("MemoryMaxScale", b"u", int(float(text[:-1]) * UINT32_MAX / 100))]
    size = parse_size(text)
    assert size is not None
    return [("MemoryMax", b"t", size)]


def memory_max(config: Config, model: Model,
               derived: Callable[[], int | None]) -> int | None:
    """The preset's memory-max, else, if memory-limit asks, the one derived from the
    estimate (memory.memory_limit, through Measure.derived_limit; asked only then: GET
    /v1/models builds every model's unit)."""
    if model.settings.memory_max:
        return parse_size(model.settings.memory_max)
    if config.memory_limit == "estimate":
        return derived()
    return None


def serves_metrics(model: Model) -> bool:
    """Whether the model's llama-server is given --metrics: by its preset's `metrics` (on
    unless it says no, build adds the flag) or by its own arguments."""
    return model.settings.metrics or args.has(model.settings.args, "--metrics")


def build(config: Config, model: Model, address: str, gpus: tuple[str, ...],
          memory_max: int | None, fit: Choice | None = None,
          cache: tuple[str, ...] = ()) -> UnitSpec:
    """`gpus`: the GPUs planned for it, by UUID; () for none. `fit`: what fitting chose
    (memory/fit.py): its arguments are part of the argv, so of the digest, and the unit's
    markers keep them for the llamad that adopts it. `cache`: the bound llamad gives the
    prompt cache (Measure.prompt_cache)."""
    metrics = ("--metrics",) if model.settings.metrics and \
        not args.has(model.settings.args, "--metrics") else ()
    kv = kvcache.unit_parts(config, model)
    fitted = fit.args if fit is not None else ()
    argv = (str(server(config, model)), *args.without_secrets(model.settings.args), *fitted,
            *cache, *metrics, *gpuload.fit_args(model), *(kv.args if kv else ()),
            *be.listen_args(address))
    chose = fit is not None and bool(fit.args or fit.reason)
    run, moved = args.for_unit_file(argv[1:])
    # The preset's env (presets.py refuses the names llamad sets itself).
    env = [*moved, *model.settings.env, gpuload.cuda_env(gpus)]
    s, unix = model.settings, config.backend == "unix"
    return UnitSpec(
        name=model.unit, description=model.id, argv=(argv[0], *run), environment=tuple(env),
        user=None if config.dynamic_user else config.unit_user,
        restart_sec=config.restart_sec, start_limit_burst=config.start_limit_burst,
        start_limit_interval=config.start_limit_interval,
        stop_timeout=s.stop_timeout if s.stop_timeout is not None else config.stop_timeout,
        memory_max=memory_max, memory_high=parse_size(s.memory_high),
        runtime_dir=be.runtime_dir(instance(model)) if unix or kv else None,
        devices=gpu_devices() if gpus else (), tcp=not unix, binds=(kv.bind,) if kv else (),
        # The preset's own `rpc` alone opens the sandbox: its rendered options, read by
        # flag arity, never the paths or the id among them (argv.walk).
        remote=rpc.addresses(rpc.workers(model.settings.args)),
        markers=Markers(model.id, address, args_digest(argv, model.settings.env),
                        " ".join(fitted) if chose else None,
                        one_line(fit.reason) if fit is not None and chose else ""))


_FITTED = (fitting.CTX, fitting.LAYERS, fitting.CPU_MOE)


def fitted_args(status: UnitStatus) -> tuple[str, ...] | None:
    """What fitting added to a running unit's argv, from its markers; None where it chose
    nothing, or the value is not what llamad writes there."""
    found = status.markers
    if found is None or found.fit is None:
        return None
    tokens = tuple(found.fit.split())
    pairs = list(zip(tokens[::2], tokens[1::2], strict=False))
    if len(tokens) % 2 or any(flag not in _FITTED or not value.isdigit()
                              for flag, value in pairs):
        return None
    return tokens


def server(config: Config, model: Model) -> Path:
    """The llama-server binary that runs the model: its preset's, else llamad.conf's."""
    return model.settings.server or config.llama_server


def matches(status: UnitStatus, spec: UnitSpec, address: str) -> bool:
    """Whether a running unit is the one llamad would start now: same argv (and preset
    environment: the digest holds both) and address."""
    found, wanted = status.markers, spec.markers
    return found is not None and wanted is not None and found.args == wanted.args \
        and found.backend == address


def args_digest(argv: tuple[str, ...], env: tuple[str, ...] = ()) -> str:
    """What LLAMAD_ARGS records: the argv and the preset's environment (without one, the
    digest of the argv alone, as before env existed: running units still match)."""
    text = "\0".join(argv) + ("\0\0" + "\0".join(env) if env else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_size(text: str | None) -> int | None:
    """A systemd size as bytes (sizes.parse_size); a percentage is of this machine's RAM."""
    return sizes.parse_size(text, mem_total)


def gpu_devices() -> tuple[str, ...]:
    nodes = sorted(str(p) for p in Path("/dev").glob("nvidia*"))
    return tuple(nodes + sorted(str(p) for p in Path("/dev/dri").glob("*")))
