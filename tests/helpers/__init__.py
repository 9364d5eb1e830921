"""What the tests share; no test module imports another (tests/test_lint.py checks).

- `daemon`: llamad in the box (`Llamad`: started, or socket-activated, or sandboxed as the
  shipped unit) and its clients (`chat`, `stream`, `models`, `wait_state`); tests get
  their llamads from the `llamad_factory` fixture (tests/integration/conftest.py), which
  stops them and checks their logs.
- `ports`: `free_port`, and `refused_url` for a port that refuses connections.
- `fakesystemd`: the one fake of systemd (the supervisor's Units port) and of
  llama-server's /health and /props; `supervised`: the real Supervisor over it (`Rig`;
  the `make_rig` fixture closes each), with `watch.Watch` to wait on what happens and
  `watch.eventually` to poll what nothing announces, never a bare sleep.
- `nvml`: pynvml faked (`FakeNvml`, `NoNvml`); `h100`: the figures measured on an H100.
- `catalogs`: model directories and catalogs (`age`, `config`, `Feed`, ...);
  `ggufgen`: small real GGUF files; `fakehub`: the Hugging Face hub on loopback.
- `fleet`, `rpcworker`: several llamad hosts behind HAProxy, an RPC worker host (for the
  `second_box` fixture); `readme`: README.md's quick start as the tests run it.

tests/rig.py, the systemd box, stays beside conftest.py: tools/ and bench/ run it too.
"""
