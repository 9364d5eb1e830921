"""Which models exist: model files, presets, GGUF headers, llama.cpp's flags and download
cache. No HTTP, no D-Bus calls."""
