"""A llama-server argv is read by flag arity (catalog/argv.py): a value is never a flag,
whatever it looks like. Every reader of a model's argv in llamad goes through it."""

from __future__ import annotations

from pathlib import Path

from llamad import redact
from llamad.catalog import argv
from llamad.catalog import rpcargs as rpc
from llamad.catalog.presets import Presets, model_settings
from llamad.memory import estimate

# Names a group-llamad user could give a model file, each a flag when read token by token.
HOSTILE = ("--rpc=127.0.0.1:8080", "--rpc", "-c=16", "-ngl=0", "--api-key", "-hft",
           "--swa-full", "-fit", "--ctx-size")


def _argv(model_id: str, *options: str) -> tuple[str, ...]:
    return model_settings(model_id, Path(f"/m/{model_id}.gguf"), None, Presets.empty(),
                          {}).args + options


def test_values_are_never_flags() -> None:
    options = list(argv.walk(("-c", "--rpc", "--alias", "-ngl", "--jinja", "-fa", "on", "x")))
    assert [(o.name, o.values) for o in options] == [
        ("--ctx-size", ("--rpc",)), ("--alias", ("-ngl",)), ("--jinja", ()),
        ("--flash-attn", ("on",)), ("x", ())]
    assert options[0].at == 0 and options[1].at == 2 and options[-1].flag is None
    assert argv.last(("-c", "1", "--ctx-size", "2"), "--ctx-size") is not None
    assert argv.has(("--no-kv-offload",), "--kv-offload")
    assert not argv.has(("--alias", "--swa-full"), "--swa-full")


def test_a_model_named_like_a_flag_changes_no_reader() -> None:
    """The readers of rpc workers, the memory estimate, secrets and KV settings see the same
    model whatever its id: the id sits after --alias, where only a value can be."""
    plain = _argv("plain", "-c", "4096")
    for name in HOSTILE:
        args = _argv(name, "-c", "4096")
        assert rpc.workers(args) == ()
        assert estimate.parse_args(args) == estimate.parse_args(plain)
        assert argv.secret_values(args) == []
        assert argv.without_secrets(args) == args
        assert argv.masked(args, redact.MASK) == list(args)
        assert not argv.has(args, "--swa-full")


def test_secrets_are_found_in_any_spelling_and_only_as_flags() -> None:
    args = ("--alias", "-hft", "-hft", "hf_one", "--hf-token", "hf_two", "-c", "1")
    assert argv.secret_values(args) == ["hf_one", "hf_two"]
    assert argv.without_secrets(args) == ("--alias", "-hft", "-c", "1")
    assert argv.masked(args, "X") == ["--alias", "-hft", "-hft", "X", "--hf-token", "X",
                                      "-c", "1"]


def test_an_argv_ending_early_keeps_what_it_has() -> None:
    assert [(o.name, o.values) for o in argv.walk(("--rpc",))] == [("--rpc", ())]
    assert rpc.workers(("--rpc",)) == ()
    assert argv.without_secrets(("-c", "1", "--api-key")) == ("-c", "1")


def test_a_unit_of_a_model_named_like_a_flag_keeps_its_sandbox(tmp_path: Path) -> None:
    """Even were such a name to reach a unit (the catalog refuses it), its unit would keep
    the sandbox of the default UNIX backend: PrivateNetwork=, AF_UNIX only, no address."""
    from llamad.catalog.catalog import Model
    from llamad.config import Config
    from llamad.supervisor import unitspec
    from llamad.systemd.units import transient_properties

    config = Config.default(models_dirs=(tmp_path,), state_dir=tmp_path / "state")
    for name in HOSTILE:
        settings = model_settings(name, tmp_path / "m.gguf", None, Presets.empty(), {})
        model = Model(id=name, aliases=(), unit="llama-server@x.service", path=tmp_path,
                      shards=(tmp_path,), mmproj=None, source="models_dir", info=None,
                      settings=settings, created=0)
        spec = unitspec.build(config, model, "unix:/run/llamad/x/llama.sock", (), None)
        props = {k: v for k, _, v in transient_properties(spec)}
        assert spec.remote == () and props["PrivateNetwork"] is True
        assert props["RestrictAddressFamilies"] == (True, ["AF_UNIX"])
        assert "IPAddressAllow" not in props
        assert spec.argv.count("--metrics") == 1


def test_what_a_unit_file_would_change_goes_in_the_environment() -> None:
    # systemd 252 reads '$' and ';' of ExecStart= back from the unit file escaped.
    given = ["--model", "/m/a $HOME;b.gguf", "--alias", "a $HOME;b", "-c", "4096",
             "--lora", "/l/x;1", "--lora", "/l/y", "--no-mmap", "--model-draft", "/m/$d"]
    run, env = argv.for_unit_file(given)
    assert run == ("-c", "4096", "--lora", "/l/x;1", "--lora", "/l/y", "--no-mmap")
    assert env == ("LLAMA_ARG_MODEL=/m/a $HOME;b.gguf", "LLAMA_ARG_ALIAS=a $HOME;b",
                   "LLAMA_ARG_SPEC_DRAFT_MODEL=/m/$d")
    plain = ["--model", "/m/a:b %n 'q'.gguf", "--alias", "a:b"]
    assert argv.for_unit_file(plain) == (tuple(plain), ())
