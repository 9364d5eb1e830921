"""Secrets in presets and args never leave llamad."""

from __future__ import annotations

import logging

from llamad import redact
from llamad.catalog import argv
from llamad.errors import BadRequest
from llamad.log import _clean


def test_secret_flags_are_dropped_and_masked() -> None:
    args = ("-m", "/m.gguf", "--hf-token", "hf_abcdef", "-c", "4096", "-hft", "hf_x1234")
    assert argv.without_secrets(args) == ("-m", "/m.gguf", "-c", "4096")
    assert argv.secret_values(args) == ["hf_abcdef", "hf_x1234"]
    assert argv.masked(args, redact.MASK)[3] == redact.MASK
    assert argv.masked(args, redact.MASK)[5] == "4096"
    preset = "[m]\nhf-token = hf_abcdef\nHF_TOKEN=hf_abcdef\nctx-size = 4096\n"
    shown = redact.text(preset)
    assert "hf_abcdef" not in shown and "ctx-size = 4096" in shown
    assert redact.text("args = '-c 1 --hf-token=hf_q9w8e7 -np 2'") == \
        f"args = '-c 1 --hf-token={redact.MASK} -np 2'"


def test_known_values_are_masked_in_errors_and_logs() -> None:
    redact.remember(["hf_remembered99"])
    err = BadRequest("llama-server said: bad token hf_remembered99")
    assert "hf_remembered99" not in err.body()["error"]["message"]
    record = logging.LogRecord("llamad", logging.WARNING, __file__, 1, "journal: %s",
                               ("token hf_remembered99",), None)
    assert _clean(record) and "hf_remembered99" not in record.getMessage()
