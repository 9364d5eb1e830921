"""tests/vm/guest/ runs inside the VM (`make test-vm`), never in the host's pytest."""

collect_ignore = ["guest"]
