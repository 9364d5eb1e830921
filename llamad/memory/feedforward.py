"""The feed-forward stage of a model's compute graph: how wide it is a token (estimate.py's
working set), dense or a mixture of experts."""

from __future__ import annotations

from llamad.memory.layers import ModelInfo


def width(info: ModelInfo, n_embd: int, graph_ff: int) -> tuple[int, int]:
    """Floats a token of the feed-forward stage: its width (a mixture of experts': the
    chosen experts', used x expert width, the expert width being feed_forward_length where
    the header gives no other, as for Mixtral), and the chosen experts' outputs before they
    are summed, used x embedding, where they find no room freed by the experts' activations
    (llama.cpp's graph allocator reuses those only where the embedding is at most twice an
    expert's width). A shared expert runs after the sum: where it is the wider stage, its
    width alone counts (`graph_ff`: the floats the graph holds per unit of width).
    test_memory.py checks each case against llama-server's buffers."""
    ff = getattr(info, "feed_forward_length", None) or 0
    used = getattr(info, "expert_used_count", None) or 0
    width = getattr(info, "expert_feed_forward_length", None) or (
        ff if getattr(info, "expert_count", None) else 0)
    if not used or not width:
        return ff or 4 * n_embd, 0
    chosen = max(ff, used * width), used * n_embd if n_embd > 2 * width else 0
    shared = getattr(info, "expert_shared_feed_forward_length", None) or 0
    return (shared, 0) if graph_ff * shared > graph_ff * chosen[0] + chosen[1] else chosen
