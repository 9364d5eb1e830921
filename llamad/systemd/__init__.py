"""Everything that speaks systemd: D-Bus calls and signals, unit names, exit statuses,
socket activation. Imports only the foundation."""
