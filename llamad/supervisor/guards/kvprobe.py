"""Whether a restore took, told before the model serves: the restored slot is sent exactly
the tokens it was saved with (read from the file llama-server wrote), asking for no more
than one token. A restore that took answers from the cache (llama-server computes only the
last token again); one that did not computes them all. Judged this way, a client's own
request can never be mistaken for a failed restore: one with `cache_prompt: false`, or an
unrelated prompt on the restored slot, computes everything whatever the restore did.

The file (llama.cpp's llama_state_seq_save_file): u32 magic "ggsq", u32 version, u32 count,
then that many 32-bit words: llama-server's packed prompt (server_tokens::serialize: -1,
its version, the token count, the tokens, the media count, the media), or, from older
builds, the tokens alone.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp

from llamad.supervisor import backend as be

MAGIC = 0x67677371  # "ggsq"
VERSION = 4  # LLAMA_STATE_SEQ_VERSION of the builds whose format this reads
MAX_TOKENS = 1 << 22  # beyond any context llama-server takes
PACKED = -1  # LLAMA_TOKEN_NULL: llama-server's packed prompt, not a bare token list
# Fewer restored tokens are not checked at all: a probe costs the load 30-50 ms (a cold
# start of Gemma 3 270M, 32 small slots restored: 0.95 s against 0.87 without), and a
# restore of so few that did not take costs little; a client's request cannot tell (above).
MIN_TOKENS = 256


def saved_tokens(path: Path) -> list[int] | None:
    """The prompt tokens a slot file holds; None where they cannot be told (another format,
    media chunks, a damaged header). The directory is the unit's: no link is followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        head = f.read(12)
        if len(head) < 12:
            return None
        magic, version, n = struct.unpack("<III", head)
        if magic != MAGIC or version != VERSION or not 0 < n <= MAX_TOKENS:
            return None
        body = f.read(4 * n)
    if len(body) < 4 * n:
        return None
    words = list(struct.unpack(f"<{n}i", body))
    if words[0] != PACKED:
        return words
    if n < 3 or not 0 <= words[2] <= n - 4:
        return None
    count = words[2]
    media = words[3 + count]
    return words[3:3 + count] if media == 0 else None


async def took(backend: be.Backend, slot: int, tokens: list[int],
               timeout: float) -> tuple[bool, int] | None:
    """(whether the restored slot answered from its cache, prompt tokens it computed);
    None where that cannot be told (too few tokens, no answer within `timeout`)."""
    if len(tokens) < 2 or timeout <= 0:
        return None
    # Only the timings come back: the whole answer would repeat the conversation's text.
    body = {"prompt": tokens, "n_predict": 0, "cache_prompt": True, "id_slot": slot,
            "response_fields": ["timings"]}
    try:
        async with backend.session().post(
                backend.base_url + "/completion", json=body,
                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            out: Any = await be.capped_json(r, be.SMALL_ANSWER)
    except (aiohttp.ClientError, OSError, ValueError, TimeoutError):
        return None
    timings = out.get("timings") if r.status == 200 and isinstance(out, dict) else None
    if not isinstance(timings, dict):
        return None
    cached, computed = timings.get("cache_n"), timings.get("prompt_n")
    if not isinstance(cached, int) or not isinstance(computed, int):
        return None
    if cached > 0:
        return True, computed
    # Nothing from the cache, and at least every token but the last computed: not taken.
    return (False, computed) if computed >= len(tokens) - 1 else None


async def judge(backend: be.Backend, slot: int, path: Path,
                deadline: float) -> tuple[bool, int] | None:
    """took() for a restored slot and the file it was restored from, within the deadline."""
    try:
        tokens = await asyncio.to_thread(saved_tokens, path)
    except OSError:
        return None
    return None if tokens is None else \
        await took(backend, slot, tokens, deadline - time.monotonic())
