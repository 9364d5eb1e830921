"""Features that hook into a model's lifecycle: GPU loads, RPC workers, saved KV caches."""
