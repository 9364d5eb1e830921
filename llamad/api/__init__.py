"""What each URL does: llama-server's routes proxied, llamad's own answers, the web UI and
dashboard."""
