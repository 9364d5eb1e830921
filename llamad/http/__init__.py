"""The door and the request plumbing: bodies, limits, keys, browsers, the request record,
the request's context. No routes."""
