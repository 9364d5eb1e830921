"""What a model needs (estimates, learned figures) and what is free (NVML, /proc)."""
