"""llamad: many llama.cpp models behind one OpenAI-compatible port, supervised by systemd."""

__version__ = "0.1.0"
