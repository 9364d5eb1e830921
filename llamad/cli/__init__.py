"""The command line's client side: catalog listing, daemon control, shell completion,
HAProxy configuration."""
