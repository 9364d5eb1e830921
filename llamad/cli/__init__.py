"""The command line's client side: catalog listing, daemon control, shell completion,
HAProxy configuration."""

# How the client commands find llamad (cli/ctl.py), named in `llamad --help` too.
ENV_URL = "LLAMAD_URL"
ENV_KEY = "LLAMAD_API_KEY"
# The most earlier journal lines /logs/stream sends (`llamad logs -n`).
LOG_LINES_MAX = 10000
