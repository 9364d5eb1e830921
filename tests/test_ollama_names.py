"""Ollama's model names as its clients type them. Ollama finds a model whatever the case of
its name (its store's paths are lower case: `ollama run Gemma3`, `gemma3:LATEST`); llamad's
names are file names, so the exact spelling goes first and another case only where it is
the one model that spelling could mean."""

from __future__ import annotations

from llamad.api import ollama_models as models

KNOWN = ["gemma", "Qwen3-8B", "user/repo:Q4_K_M", "user/repo:Q8_0"]


def test_a_name_in_another_case_finds_its_model() -> None:
    assert models.candidates("Gemma", KNOWN) == ["Gemma", "gemma"]
    assert models.candidates("qwen3-8b:latest", KNOWN) == \
        ["qwen3-8b:latest", "qwen3-8b", "Qwen3-8B"]
    assert models.candidates("gemma:LATEST", KNOWN) == ["gemma:LATEST", "gemma"]
    assert models.candidates("hf.co/User/Repo", KNOWN)[-2:] == \
        ["user/repo:Q4_K_M", "user/repo:Q8_0"]


def test_the_exact_spelling_comes_first() -> None:
    """Two files that differ only in case are two models: each name means its own."""
    both = ["Gemma", "gemma"]
    assert models.candidates("gemma", both)[0] == "gemma"
    assert models.candidates("Gemma", both)[0] == "Gemma"
    # A spelling that is neither: no guess between them.
    assert models.candidates("GEMMA", both) == ["GEMMA"]
    assert models.candidates("nothing", KNOWN) == ["nothing"]
