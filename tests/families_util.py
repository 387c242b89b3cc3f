"""Tiny random transformers models of every supported family, saved once per test module.

Each :class:`Family` says how to build the model from a transformers config (no hub, no network)
and what naming must make of its tensors: where the layer index sits in the stored names, which
expert an MoE matrix belongs to, the role of a representative set of tensors, and which tensors
belong to the head (absent from the bare ``AutoModel`` checkpoint).

:class:`ModelZoo` builds, saves and caches: the base model (``base/``), a perturbed copy of its
weights (``tuned/``, same config), and for the wrapper-prefix checks a bare ``AutoModel`` next to
the head model with untied output embeddings.
"""

from __future__ import annotations

import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

#: Seed of every model's initialisation (torch.manual_seed before from_config).
MODEL_SEED = 0
#: The perturbation ΔW of a 2-D tensor: a rank-PERTURB_RANK part (about 2/3 of the energy) plus
#: dense noise (about 1/3), small next to the weights (initialised with std 0.02). Energy ranks at
#: 0.9 then fall inside the noise bulk, so they depend on the whole spectrum, not on its top alone.
PERTURB_RANK = 6
PERTURB_LOWRANK_SCALE = 1e-3
PERTURB_NOISE_SCALE = 7e-4

_DENSE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
#: Stacked-expert families: hidden 32, 4 heads of 8 (2 kv heads), 2 layers, 4 experts.
N_STACKED_EXPERTS = 4
_MOE_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  vocab_size=100)
_FALCON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
#: Granite-MoE: stacked experts stored (experts, out, in) outside an ``experts`` module.
_GRANITE_MOE = dict(_MOE_SMALL, intermediate_size=24, num_local_experts=N_STACKED_EXPERTS, num_experts_per_tok=2)


def _granite_moe_roles(shared: bool) -> dict[str, str | None]:
    roles: dict[str, str | None] = {"model.embed_tokens.weight": "embed", "lm_head.weight": "head"}
    for i in (0, 1):
        roles.update({f"model.layers.{i}.self_attn.{x}_proj.weight": x for x in "qkvo"})
        roles[f"model.layers.{i}.block_sparse_moe.router.layer.weight"] = "router"
        roles[f"model.layers.{i}.block_sparse_moe.input_linear.weight"] = "gate_up"
        roles[f"model.layers.{i}.block_sparse_moe.output_linear.weight"] = "down"
        if shared:
            roles[f"model.layers.{i}.shared_mlp.input_linear.weight"] = "gate_up"
            roles[f"model.layers.{i}.shared_mlp.output_linear.weight"] = "down"
    return roles


@dataclass(frozen=True)
class Family:
    """One model family (or one layout of it) and what naming must make of its checkpoint.

    Attributes:
        name: test id.
        model_type: transformers ``model_type`` for ``AutoConfig.for_model``.
        config: the small config's keyword arguments.
        head: ``"causal"``, ``"seq2seq"`` or ``"masked"``: the AutoModelFor… class of the base model.
        layer_pattern: regex whose group 1 is the layer index of a stored name; names it does not
            match are outside the layer stack (layer None).
        roles: stored name -> expected role, for a representative set (layer 0 and layer 1).
        head_prefixes: name prefixes of head-only tensors (absent from the bare AutoModel's checkpoint).
        bare_only_prefixes: name prefixes (without wrapper) of tensors only the bare model has.
        wrapped: the head model's names carry a wrapper prefix the bare model's names lack.
    """

    name: str
    model_type: str
    config: dict[str, Any]
    head: str
    layer_pattern: str
    roles: dict[str, str | None]
    head_prefixes: tuple[str, ...] = ()
    bare_only_prefixes: tuple[str, ...] = ()
    wrapped: bool = True
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16

    def expected_layer(self, name: str) -> int | None:
        m = re.match(self.layer_pattern, name)
        return int(m.group(1)) if m else None


EXPERT_PATTERN = re.compile(r".*\.experts\.(\d+)\.")

#: Names of 3-D expert stacks stored outside an ``experts`` module (Granite-MoE).
GRANITE_STACK_SUFFIXES = ("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight")


def expected_expert(name: str) -> int | None:
    m = EXPERT_PATTERN.match(name)
    return int(m.group(1)) if m else None


def _llama_like_roles(prefix: str = "model.layers") -> dict[str, str | None]:
    roles: dict[str, str | None] = {"model.embed_tokens.weight": "embed"}
    for i in (0, 1):
        for leaf, role in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                           ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                           ("mlp.down_proj", "down")):
            roles[f"{prefix}.{i}.{leaf}.weight"] = role
    return roles


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "llama", {**_DENSE, "num_key_value_heads": 2}, "causal", r"^model\.layers\.(\d+)\.",
           {**_llama_like_roles(), "lm_head.weight": "head"}, ("lm_head.",), num_kv_heads=2),
    Family("mistral", "mistral", {**_DENSE, "num_key_value_heads": 2}, "causal", r"^model\.layers\.(\d+)\.",
           {**_llama_like_roles(), "lm_head.weight": "head"}, ("lm_head.",), num_kv_heads=2),
    Family("qwen2", "qwen2", {**_DENSE, "num_key_value_heads": 2}, "causal", r"^model\.layers\.(\d+)\.",
           {**_llama_like_roles(), "lm_head.weight": "head"}, ("lm_head.",), num_kv_heads=2),
    Family("gemma", "gemma", {**_DENSE, "num_key_value_heads": 2, "head_dim": 16}, "causal",  # lm_head tied
           r"^model\.layers\.(\d+)\.", _llama_like_roles(), ("lm_head.",), num_kv_heads=2),
    Family("phi3", "phi3", {**_DENSE, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1,
                            "eos_token_id": 2}, "causal", r"^model\.layers\.(\d+)\.",
           {"model.embed_tokens.weight": "embed", "lm_head.weight": "head",
            **{f"model.layers.{i}.{leaf}.weight": role for i in (0, 1) for leaf, role in (
                ("self_attn.qkv_proj", "qkv"), ("self_attn.o_proj", "o"), ("mlp.gate_up_proj", "gate_up"),
                ("mlp.down_proj", "down"))}},
           ("lm_head.",), num_kv_heads=2),
    Family("gpt2", "gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64,
                            "bos_token_id": 0, "eos_token_id": 0}, "causal", r"^transformer\.h\.(\d+)\.",
           {"transformer.wte.weight": "embed", "transformer.wpe.weight": "pos_embed",
            **{f"transformer.h.{i}.{leaf}.weight": role for i in (0, 1) for leaf, role in (
                ("attn.c_attn", "qkv"), ("attn.c_proj", "o"), ("mlp.c_fc", "up"), ("mlp.c_proj", "down"))}},
           ("lm_head.",)),
    Family("gpt_neox", "gpt_neox", dict(_DENSE), "causal", r"^gpt_neox\.layers\.(\d+)\.",
           {"gpt_neox.embed_in.weight": "embed", "embed_out.weight": "head",
            **{f"gpt_neox.layers.{i}.{leaf}.weight": role for i in (0, 1) for leaf, role in (
                ("attention.query_key_value", "qkv"), ("attention.dense", "o"), ("mlp.dense_h_to_4h", "up"),
                ("mlp.dense_4h_to_h", "down"))}},
           ("embed_out.",)),
    *[Family(name, "falcon", {**_FALCON, **extra}, "causal", r"^transformer\.h\.(\d+)\.",
             {"transformer.word_embeddings.weight": "embed",
              **{f"transformer.h.{i}.{leaf}.weight": role for i in (0, 1) for leaf, role in (
                  ("self_attention.query_key_value", "qkv"), ("self_attention.dense", "o"),
                  ("mlp.dense_h_to_4h", "up"), ("mlp.dense_4h_to_h", "down"))}},
             ("lm_head.",), num_kv_heads=kv)
      for name, extra, kv in (
          ("falcon", {}, 1),  # default: multi_query=True, one k and one v head
          ("falcon_new", {"new_decoder_architecture": True, "num_kv_heads": 2}, 2),
          ("falcon_interleaved", {"multi_query": False}, 4),
      )],
    Family("bert", "bert", {**_DENSE, "max_position_embeddings": 64}, "masked", r"^bert\.encoder\.layer\.(\d+)\.",
           {"bert.embeddings.word_embeddings.weight": "embed", "bert.embeddings.position_embeddings.weight": "pos_embed",
            **{f"bert.encoder.layer.{i}.{leaf}.weight": role for i in (0, 1) for leaf, role in (
                ("attention.self.query", "q"), ("attention.self.key", "k"), ("attention.self.value", "v"),
                ("attention.output.dense", "o"), ("intermediate.dense", "up"), ("output.dense", "down"))}},
           ("cls.",), bare_only_prefixes=("pooler.",)),
    Family("t5", "t5", {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4, "vocab_size": 100},
           "seq2seq", r"^(?:encoder|decoder)\.block\.(\d+)\.",
           {"shared.weight": "embed",
            **{f"{stack}.block.{i}.layer.0.SelfAttention.{x}.weight": x for stack in ("encoder", "decoder")
               for i in (0, 1) for x in "qkvo"},
            **{f"decoder.block.{i}.layer.1.EncDecAttention.{x}.weight": f"cross_{x}" for i in (0, 1) for x in "qkvo"},
            **{f"encoder.block.{i}.layer.1.DenseReluDense.{leaf}.weight": role for i in (0, 1)
               for leaf, role in (("wi", "up"), ("wo", "down"))},
            **{f"decoder.block.{i}.layer.2.DenseReluDense.{leaf}.weight": role for i in (0, 1)
               for leaf, role in (("wi", "up"), ("wo", "down"))}},
           wrapped=False),  # T5Model and T5ForConditionalGeneration share names; lm_head is tied
    Family("mixtral", "mixtral", {**_DENSE, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
           "causal", r"^model\.layers\.(\d+)\.",
           {"model.embed_tokens.weight": "embed", "lm_head.weight": "head",
            **{f"model.layers.{i}.self_attn.{x}_proj.weight": x for i in (0, 1) for x in "qkvo"},
            **{f"model.layers.{i}.block_sparse_moe.gate.weight": "router" for i in (0, 1)},
            **{f"model.layers.{i}.block_sparse_moe.experts.{e}.{leaf}.weight": role for i in (0, 1) for e in (0, 3)
               for leaf, role in (("w1", "gate"), ("w3", "up"), ("w2", "down"))}},
           ("lm_head.",), num_kv_heads=2),
    Family("qwen2_moe", "qwen2_moe", {**_DENSE, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
           "causal", r"^model\.layers\.(\d+)\.",
           {"model.embed_tokens.weight": "embed", "lm_head.weight": "head",
            **{f"model.layers.{i}.self_attn.{x}_proj.weight": x for i in (0, 1) for x in "qkvo"},
            **{f"model.layers.{i}.mlp.gate.weight": "router" for i in (0, 1)},
            **{f"model.layers.{i}.mlp.{where}.{x}_proj.weight": x for i in (0, 1)
               for where in ("experts.0", "experts.3", "shared_expert") for x in ("gate", "up", "down")}},
           ("lm_head.",), num_kv_heads=2),
    # Stacked 3-D experts stored (experts, in, out) and applied as x @ W[e] (torch.bmm): Llama-4's
    # text model (every layer MoE, with a shared expert) and gpt-oss (interleaved gate/up, per-expert
    # biases stored (experts, out)). gpt-oss keeps its down_proj square (hidden = intermediate, as the
    # real 2880 × 2880): only config.json's model_type can orient it.
    Family("llama4", "llama4_text", {**_MOE_SMALL, "intermediate_size": 48, "intermediate_size_mlp": 40,
                                     "num_local_experts": N_STACKED_EXPERTS, "num_experts_per_tok": 1},
           "causal", r"^model\.layers\.(\d+)\.",
           {"model.embed_tokens.weight": "embed", "lm_head.weight": "head",
            **{f"model.layers.{i}.self_attn.{x}_proj.weight": x for i in (0, 1) for x in "qkvo"},
            **{f"model.layers.{i}.feed_forward.router.weight": "router" for i in (0, 1)},
            **{f"model.layers.{i}.feed_forward.experts.{leaf}": role for i in (0, 1)
               for leaf, role in (("gate_up_proj", "gate_up"), ("down_proj", "down"))},
            **{f"model.layers.{i}.feed_forward.shared_expert.{x}_proj.weight": x for i in (0, 1)
               for x in ("gate", "up", "down")}},
           ("lm_head.",), num_kv_heads=2, head_dim=8),
    Family("gpt_oss", "gpt_oss", {**_MOE_SMALL, "intermediate_size": 32, "num_local_experts": N_STACKED_EXPERTS,
                                  "num_experts_per_tok": 2},
           "causal", r"^model\.layers\.(\d+)\.",
           {"model.embed_tokens.weight": "embed", "lm_head.weight": "head",
            **{f"model.layers.{i}.self_attn.{x}_proj.weight": x for i in (0, 1) for x in "qkvo"},
            **{f"model.layers.{i}.mlp.router.weight": "router" for i in (0, 1)},
            **{f"model.layers.{i}.mlp.experts.{leaf}": role for i in (0, 1)
               for leaf, role in (("gate_up_proj", "gate_up"), ("down_proj", "down"))}},
           ("lm_head.",), num_kv_heads=2, head_dim=8),
    # Granite-MoE: checkpoints store block_sparse_moe.input_linear.weight (experts, 2·inter, hidden)
    # and output_linear.weight (experts, hidden, inter), applied with F.linear, gate rows first
    # (transformers renames them experts.gate_up_proj / down_proj on load); the router is
    # block_sparse_moe.router.layer.weight. The -shared variant adds a dense shared_mlp whose
    # input_linear is fused the same way.
    Family("granitemoe", "granitemoe", dict(_GRANITE_MOE), "causal", r"^model\.layers\.(\d+)\.",
           _granite_moe_roles(shared=False), ("lm_head.",), num_kv_heads=2, head_dim=8),
    Family("granitemoeshared", "granitemoeshared", {**_GRANITE_MOE, "shared_intermediate_size": 24}, "causal",
           r"^model\.layers\.(\d+)\.", _granite_moe_roles(shared=True), ("lm_head.",), num_kv_heads=2, head_dim=8),
    # Granite-MoE-hybrid (Mamba-2 + attention layers, the same expert layout): only for the expert
    # forward check, since its Mamba conv1d weight (3-D, not an expert stack) sits outside the
    # per-family checks' tensor accounting.
    Family("granitemoehybrid", "granitemoehybrid",
           {**_GRANITE_MOE, "shared_intermediate_size": 24, "layer_types": ["mamba", "attention"], "mamba_n_heads": 4,
            "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 16},
           "causal", r"^model\.layers\.(\d+)\.", {}, ("lm_head.",), num_kv_heads=2, head_dim=8),
]}

#: Families whose experts are stored as one 3-D tensor per layer and matrix.
STACKED_FAMILIES = ("llama4", "gpt_oss", "granitemoe", "granitemoeshared")

#: Families built only for the stacked-expert forward checks, not the per-family ones.
FORWARD_ONLY_FAMILIES = ("granitemoehybrid",)

FAMILY_NAMES = [n for n in FAMILIES if n not in FORWARD_ONLY_FAMILIES]


def build_model(family: Family, *, bare: bool = False, untie: bool = False) -> torch.nn.Module:
    """The family's tiny random model (seeded), in eval mode, float32."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    kwargs = dict(family.config)
    if untie:
        kwargs["tie_word_embeddings"] = False
    config = AutoConfig.for_model(family.model_type, **kwargs)
    cls = AutoModel if bare else {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
                                   "masked": AutoModelForMaskedLM}[family.head]
    torch.manual_seed(MODEL_SEED)
    return cls.from_config(config).eval()


def perturb_copy(src: Path, dst: Path, seed: int) -> None:
    """Copy the checkpoint folder ``src`` to ``dst`` with every float tensor slightly changed.

    2-D tensors and each expert of a 3-D stack get a rank-PERTURB_RANK update plus dense noise; other
    tensors get noise only.
    """
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    g = torch.Generator().manual_seed(seed)
    state = load_file(src / "model.safetensors")
    out = {}
    for name, w in state.items():
        noise = PERTURB_NOISE_SCALE * torch.randn(w.shape, generator=g)
        if w.ndim in (2, 3):
            a = torch.randn(*w.shape[:-1], PERTURB_RANK, generator=g)
            b = torch.randn(*w.shape[:-2], PERTURB_RANK, w.shape[-1], generator=g)
            noise = noise + PERTURB_LOWRANK_SCALE * (a @ b) / PERTURB_RANK**0.5
        out[name] = (w.to(torch.float32) + noise).to(w.dtype).contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


@dataclass
class Built:
    """A saved base model, its perturbed copy, and the live base model (for forward checks)."""

    family: Family
    model: torch.nn.Module
    base_dir: Path
    tuned_dir: Path


@dataclass
class ModelZoo:
    """Builds each family's checkpoints on first use and keeps them for the rest of the module."""

    root: Path
    _built: dict[str, Built] = field(default_factory=dict)
    _prefix: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def get(self, name: str) -> Built:
        if name not in self._built:
            family = FAMILIES[name]
            model = build_model(family)
            base, tuned = self.root / name / "base", self.root / name / "tuned"
            model.save_pretrained(base)
            perturb_copy(base, tuned, seed=zlib.crc32(name.encode()))
            self._built[name] = Built(family, model, base, tuned)
        return self._built[name]

    def prefix_pair(self, name: str) -> tuple[Path, Path]:
        """(bare AutoModel folder, head model folder), output embeddings untied so a head is stored."""
        if name not in self._prefix:
            family = FAMILIES[name]
            bare, head = self.root / name / "bare", self.root / name / "head"
            build_model(family, bare=True, untie=True).save_pretrained(bare)
            build_model(family, untie=True).save_pretrained(head)
            self._prefix[name] = (bare, head)
        return self._prefix[name]


def reference_energy_rank(delta: np.ndarray, tau: float) -> tuple[int, bool]:
    """Energy rank at τ of a float64 matrix by numpy's SVD, and whether it is clear of the threshold.

    Returns ``(k, clear)``: k is the smallest k with cumsum(σ²)[k-1] ≥ τ·Σσ²; ``clear`` is False
    when some cumulative energy lies within 1e-6 (relative) of τ·Σσ², where rounding in a correct
    implementation may move k by one.
    """
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    energy = np.cumsum(s**2)
    total = energy[-1]
    if total == 0:
        return 0, True
    k = int(np.argmax(energy >= tau * total)) + 1
    clear = bool(np.min(np.abs(energy / total - tau)) > 1e-6)
    return k, clear


def save_perturbed_pair(tmp_path: Path, model: torch.nn.Module, name: str, seed: int = 1):
    """Save ``model`` as base (``<name>_b``), add 0.01·N(0, 1) to every 2-D parameter, save as tuned
    (``<name>_t``); returns both folders and float64 copies of both state dicts."""
    base, tuned = tmp_path / f"{name}_b", tmp_path / f"{name}_t"
    model.save_pretrained(base)
    b = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.ndim == 2:
                prm.add_(0.01 * torch.randn(prm.shape, generator=g))
    model.save_pretrained(tuned)
    t = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    return base, tuned, b, t


def fro_by_name(base: Path, tuned: Path) -> dict[str, float]:
    """``spectra.diff(base, tuned)``'s ‖ΔW‖_F per result name."""
    import spectra

    return {m.name: m.fro_norm for m in spectra.diff(str(base), str(tuned)).modules}
