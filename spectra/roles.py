"""Cross-architecture roles of weight matrices (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``, ``embed``, ``head``…)
from module names, and the order tables and heatmaps show them in. Pure: names in, labels out.

Checkpoints name one logical matrix differently (``q_proj``, ``query``, ``wq``, ``c_attn``'s first block): a role lets
results of different families line up. :func:`role_of` reads a module's own name and its parent's; the tables below
hold what is known; an unknown module has no role and sorts after the known ones.
"""

from __future__ import annotations

#: Column order of tables and heatmaps, by role; unknown roles come after, alphabetically.
ROLE_ORDER = (
    "embed", "pos_embed", "q_a", "q", "kv_a", "k", "v", "qkv", "kv", "o", "cross_q", "cross_k", "cross_v", "cross_o",
    "router", "gate", "up", "gate_up", "down", "head",
)

ATTN_PARENTS = frozenset({"attn", "self_attn", "attention", "self_attention", "selfattention", "mixer"})
CROSS_PARENTS = frozenset({"encdecattention", "crossattention", "encoder_attn", "cross_attn"})
MLP_PARENTS = frozenset({"mlp", "feed_forward", "densereludense", "ffn", "intermediate", "shared_expert", "experts"})

#: Roles that need the parent's name too: ``(parent, leaf)`` -> role.
PARENT_LEAF_ROLES = {
    ("block_sparse_moe", "input_linear"): "gate_up", ("block_sparse_moe", "output_linear"): "down",
    # Granite-MoE-shared/hybrid's dense shared MLP: input_linear(x).chunk(2, dim=-1) -> gate, up
    ("shared_mlp", "input_linear"): "gate_up", ("shared_mlp", "output_linear"): "down",
    ("router", "layer"): "router",  # Granite-MoE's block_sparse_moe.router.layer.weight
    ("gate", "weight_1"): "router",  # ERNIE-4.5-VL's vision-expert router mlp.gate.weight_1
    # RWKV's channel mix: value(relu(key(x))²), an MLP's up and down (not attention's k and v)
    ("feed_forward", "key"): "up", ("feed_forward", "value"): "down",
    ("attn", "qkv"): "qkv", ("attn", "proj"): "o",  # ViT-style attention: timm, Qwen2-VL's and InternViT's vision towers
    ("attention", "output"): "o",  # RWKV's time mix
}

#: Roles a model type gives a leaf that others use otherwise: ``model_type -> {leaf: role}``. ChatGLM's
#: ``dense_h_to_4h`` is SwiGLU's gate and up (``chunk(2)``, gate first) where GPT-NeoX's and Bloom's is an up.
MODEL_LEAF_ROLES = {"chatglm": {"dense_h_to_4h": "gate_up"}, "modernbert": {"wi": "gate_up"}, "modernbert-decoder": {"wi": "gate_up"}}

#: ``(parent, leaf)`` -> role where the leaf's spelling tells families apart without a config.json: ModernBERT's
#: ``mlp.Wi`` is gated (``input, gate = Wi(x).chunk(2)``; act(input) * gate), Switch Transformers' ``mlp.wi`` and T5's
#: ``DenseReluDense.wi`` are a plain up projection.
CASED_PARENT_LEAF_ROLES = {("mlp", "Wi"): "gate_up"}

LEAF_ROLES = {
    "q_proj": "q", "query": "q", "wq": "q", "q_attn": "q", "query_proj": "q",  # query_proj…: DeBERTa-v2
    "k_proj": "k", "key": "k", "wk": "k", "key_proj": "k",
    "v_proj": "v", "value": "v", "wv": "v", "value_proj": "v",
    "o_proj": "o", "out_proj": "o",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "w_pack": "qkv", "wqkv": "qkv", "in_proj_weight": "qkv",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "dense_h_to_4h": "up", "c_fc": "up", "fc1": "up", "wi": "up", "fc_in": "up",  # fc_in: GPT-J
    "down_proj": "down", "w2": "down", "dense_4h_to_h": "down", "fc2": "down", "fc_out": "down",
    "wi_0": "gate", "wi_1": "up",  # T5's gated DenseReluDense: act(wi_0(x)) * wi_1(x)
    "gate_up_proj": "gate_up",
    # DeepSeek-V2/V3's latent attention: q = q_b(norm(q_a(x))); [c, k_rope] = kv_a(x); [k_nope, v] per head = kv_b(norm(c))
    "q_a_proj": "q_a", "q_b_proj": "q", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv",
    "router": "router",
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed", "embed_in": "embed",
    "shared": "embed", "tok_embeddings": "embed",
    # Mamba's backbone.embeddings, OpenAI-GPT's tokens_embed, CLIP's token_embedding (a tied head pairs with these);
    # not CLIP's vision position_embedding: its rows are a patch grid's, not leading positions kept across a resize
    "embeddings": "embed", "tokens_embed": "embed", "token_embedding": "embed",
    "wpe": "pos_embed", "position_embeddings": "pos_embed", "positions_embed": "pos_embed", "embed_positions": "pos_embed",
    "lm_head": "head", "embed_out": "head",
}


def role_of(leaf: str, parent: str, layer: int | None, rel_path: str, model_type: str | None = None) -> str | None:
    """The cross-architecture role (:data:`ROLE_ORDER`) of a module from its own name ``leaf``, its parent's, its layer
    (None outside the stack), its path without wrappers and indices and ``config.json``'s model type; None when unknown."""
    cased, leaf, parent = leaf, leaf.lower(), parent.lower()
    role = (MODEL_LEAF_ROLES.get(model_type or "", {}).get(leaf) or CASED_PARENT_LEAF_ROLES.get((parent, cased))
            or PARENT_LEAF_ROLES.get((parent, leaf)) or LEAF_ROLES.get(leaf))
    cross = parent in CROSS_PARENTS
    if role is None:
        if leaf in ("q", "k", "v", "o"):
            role = leaf
        elif leaf in ("dense", "c_proj", "wo"):
            if parent in ATTN_PARENTS or cross or (leaf == "dense" and parent == "output" and "attention" in rel_path):
                role = "o"
            elif parent in MLP_PARENTS or parent == "output":
                role = "down"
            elif leaf == "dense" and parent == "intermediate":
                role = "up"
        elif leaf == "gate" and parent in ("block_sparse_moe", "mlp", "moe", "feed_forward"):  # LFM2-MoE: feed_forward
            role = "router"
        elif leaf == "output" and layer is None:  # (a bare `head` is timm's classifier as often as RWKV's output head)
            role = "head"
    if parent == "intermediate" and leaf == "dense":
        role = "up"
    if cross and role in ("q", "k", "v", "o"):
        role = "cross_" + role
    return role


def role_sort_key(role: str | None, module: str) -> tuple[int, str, int, str]:
    """Sort key putting modules in ROLE_ORDER, unknown roles last; the parts of a fused one (``c_attn:q``) in its
    order, q, k, v and gate, up (alphabetically they read k, q, v)."""
    rank = ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)
    head, colon, part = module.rpartition(":")
    if colon and part in _PART_ORDER:
        return (rank, head, _PART_ORDER.index(part), module)
    return (rank, module, -1, module)


_PART_ORDER = ("q", "k", "v", "gate", "up")


def part_role(role: str | None, module: str, rel_path: str = "") -> str | None:
    """The role of one part of a fused matrix, whose module label ends in the part (``c_attn:v`` of a ``qkv`` matrix:
    ``v``; ``cross_v`` under a cross-attention ``rel_path``; ``gate_up_proj:e2:gate``: ``gate``), else ``role``: a
    filter on ``role == "v"`` finds every model's v, fused or not."""
    head, colon, part = module.rpartition(":")
    if not colon or role not in ("qkv", "gate_up", "kv") or part not in _PART_ORDER:
        return role
    cross = part in ("q", "k", "v") and any(c.lower() in CROSS_PARENTS for c in rel_path.split("."))
    return f"cross_{part}" if cross else part


__all__ = ["ATTN_PARENTS", "CASED_PARENT_LEAF_ROLES", "CROSS_PARENTS", "LEAF_ROLES", "MLP_PARENTS", "MODEL_LEAF_ROLES",
           "PARENT_LEAF_ROLES", "ROLE_ORDER", "part_role", "role_of", "role_sort_key"]
