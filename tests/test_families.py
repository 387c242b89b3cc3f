"""Naming, pairing, fused-matrix splits and ``spectra diff`` on tiny random models of every family.

Each family (tests/families_util.py) is built from a transformers config with fixed seeds (hidden 64,
2 layers, 4 heads, vocab 100), saved once per module, and checked against what transformers itself
does: the q/k/v rows of a fused matrix are compared with the modeling code's own split of the fused
layer's output, and energy ranks with a float64 numpy SVD of the stored tensors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from families_util import (
    FAMILIES,
    FAMILY_NAMES,
    FORWARD_ONLY_FAMILIES,
    GRANITE_STACK_SUFFIXES,
    N_STACKED_EXPERTS,
    STACKED_FAMILIES,
    Family,
    ModelZoo,
    expected_expert,
    reference_energy_rank,
)
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

import spectra
from spectra.config import DiffConfig
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.naming import MatrixSpec, describe_checkpoint
from spectra.pairing import pair_checkpoints
from spectra_cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

#: Seed of the random inputs fed through fused layers.
INPUT_SEED = 1234
#: x @ W_part.T against the fused layer's own output, float32 with 64-term dot products.
FORWARD_RTOL, FORWARD_ATOL = 1e-5, 1e-6
#: fro_norm of a result against numpy's float64 reference.
NORM_RTOL = 1e-6
#: energy_rank[0.9] must match the reference on at least this fraction of results; the rest may
#: only be skipped when their cumulative energy is within 1e-6 (relative) of the threshold.
MIN_COMPARED_FRACTION = 0.9



@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> ModelZoo:
    """Every family's checkpoints, built and saved on first use, kept for the whole module."""
    return ModelZoo(tmp_path_factory.mktemp("families"))


def _specs(ckpt: Checkpoint) -> dict[str, MatrixSpec]:
    return describe_checkpoint({n: t.shape for n, t in ckpt.tensors.items()}, ckpt.arch)


def _names_by_rank(ckpt: Checkpoint, ndim: int) -> set[str]:
    return {n for n, t in ckpt.tensors.items() if len(t.shape) == ndim}


def _matrix_names(ckpt: Checkpoint) -> set[str]:
    """2-D tensors other than gpt-oss's per-expert biases ``(experts, out)``, and 3-D expert stacks
    (under ``experts``, or Granite-MoE's ``block_sparse_moe.input_linear`` / ``output_linear``)."""
    return ({n for n in _names_by_rank(ckpt, 2) if not n.endswith("_bias")}
            | {n for n in _names_by_rank(ckpt, 3) if ".experts." in n or n.endswith(GRANITE_STACK_SUFFIXES)})


# ---------------------------------------------------------------------------------------------
# 1. Every matrix is described: layer, expert, role, module label
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_matrix_gets_a_spec_with_its_layer_and_expert(zoo, name):
    family = FAMILIES[name]
    ckpt = open_checkpoint(zoo.get(name).base_dir)
    specs = _specs(ckpt)

    assert set(specs) == _matrix_names(ckpt)
    for tensor, spec in specs.items():
        assert spec.name == tensor
        assert spec.layer == family.expected_layer(tensor), tensor
        assert spec.expert == expected_expert(tensor), tensor
    # The oracle itself must have seen both layers and the tensors outside the stack.
    assert {s.layer for s in specs.values()} == {None, 0, 1}
    if name in ("mixtral", "qwen2_moe"):
        assert {s.expert for s in specs.values()} == {None, 0, 1, 2, 3}
    if name in STACKED_FAMILIES:  # one spec per stack; the expert index comes with each result
        assert sum(len(ckpt.tensors[n].shape) == 3 for n in specs) == 4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_representative_matrices_have_the_expected_roles(zoo, name):
    family = FAMILIES[name]
    specs = _specs(open_checkpoint(zoo.get(name).base_dir))

    assert set(family.roles) <= set(specs), "the roles table names tensors the checkpoint lacks"
    assert {n: specs[n].role for n in family.roles} == family.roles


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_module_labels_are_unique_per_module_path(zoo, name):
    """Module path: the stored name with layer/expert/sub-layer numbers blanked out."""
    specs = _specs(open_checkpoint(zoo.get(name).base_dir))
    labels_by_path: dict[str, set[str]] = defaultdict(set)
    for tensor, spec in specs.items():
        labels_by_path[re.sub(r"(?<=\.)\d+(?=\.)", "#", tensor)].add(spec.module)

    assert all(len(labels) == 1 for labels in labels_by_path.values()), labels_by_path
    labels = [next(iter(ls)) for ls in labels_by_path.values()]
    assert len(set(labels)) == len(labels), sorted(labels)


def test_gpt2_and_bert_labels_tell_same_named_modules_apart(zoo):
    gpt2 = _specs(open_checkpoint(zoo.get("gpt2").base_dir))
    assert gpt2["transformer.h.1.attn.c_proj.weight"].module == "attn.c_proj"
    assert gpt2["transformer.h.1.mlp.c_proj.weight"].module == "mlp.c_proj"
    bert = _specs(open_checkpoint(zoo.get("bert").base_dir))
    dense = {bert[f"bert.encoder.layer.1.{m}.weight"].module for m in
             ("attention.output.dense", "output.dense", "intermediate.dense")}
    assert len(dense) == 3


# ---------------------------------------------------------------------------------------------
# 2. Pairing with a perturbed copy of the same model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_matrix_pairs_with_a_perturbed_copy(zoo, name):
    built = zoo.get(name)
    base, tuned = open_checkpoint(built.base_dir), open_checkpoint(built.tuned_dir)
    matrices, vectors = _matrix_names(base), _names_by_rank(base, 1)
    expert_biases = {n for n in base.tensors if n.endswith("_bias") and len(base.tensors[n].shape) == 2}
    assert matrices | vectors | expert_biases == set(base.tensors), "unexpected tensors in the checkpoint"
    assert bool(expert_biases) == (name == "gpt_oss")

    pairing = pair_checkpoints(base, tuned)

    assert sorted(p.tuned.name for p in pairing.pairs) == sorted(matrices)
    assert all(p.base.name == p.tuned.name and p.rows is None for p in pairing.pairs)
    assert pairing.base_only == [] and pairing.tuned_only == []
    skipped = {s.name: s.reason for s in pairing.skipped}
    assert set(skipped) == vectors | expert_biases
    assert all("1-D" in skipped[n] for n in vectors), skipped
    assert all(skipped[n] == "per-expert bias, not a weight matrix" for n in expert_biases), skipped


# ---------------------------------------------------------------------------------------------
# 3. Pairing across wrapper prefixes: bare AutoModel (base) vs the model with a head (tuned)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_bare_model_pairs_with_head_model_across_wrapper_prefix(zoo, name):
    family: Family = FAMILIES[name]
    bare_dir, head_dir = zoo.prefix_pair(name)
    bare, head = open_checkpoint(bare_dir), open_checkpoint(head_dir)

    pairing = pair_checkpoints(bare, head)

    head_only = {n for n in head.tensors if n.startswith(family.head_prefixes)} if family.head_prefixes else set()
    bare_only = {n for n in bare.tensors if n.startswith(family.bare_only_prefixes)} if family.bare_only_prefixes else set()
    assert set(pairing.tuned_only) == head_only
    assert set(pairing.base_only) == bare_only
    if family.head_prefixes:
        assert head_only, "the untied head must be stored in the head model's checkpoint"
    # Every matrix of the head model outside its head pairs, every layer matrix in particular.
    head_specs = _specs(head)
    paired = {p.tuned.name for p in pairing.pairs}
    assert paired == set(head_specs) - head_only
    assert {n for n, s in head_specs.items() if s.layer is not None} <= paired
    for p in pairing.pairs:
        assert p.tuned.name.endswith(p.base.name)
        assert (p.tuned.name != p.base.name) == family.wrapped, p.tuned.name
        assert (p.base.key, p.base.layer, p.base.expert, p.base.role) == (p.tuned.key, p.tuned.layer, p.tuned.expert, p.tuned.role)


# ---------------------------------------------------------------------------------------------
# 4. Fused matrices: the split rows reproduce transformers' own split of the fused output
# ---------------------------------------------------------------------------------------------


def _phi3_qkv(model, i, out):
    attn = model.model.layers[i].self_attn  # Phi3Attention.forward
    query_pos = attn.config.num_attention_heads * attn.head_dim
    kv = attn.num_key_value_heads * attn.head_dim
    return {"q": out[..., :query_pos], "k": out[..., query_pos:query_pos + kv], "v": out[..., query_pos + kv:]}


def _phi3_gate_up(model, i, out):
    gate, up = out.chunk(2, dim=-1)  # Phi3MLP.forward
    return {"gate": gate, "up": up}


def _gpt2_c_attn(model, i, out):
    attn = model.transformer.h[i].attn  # GPT2Attention.forward
    q, k, v = out.split(attn.split_size, dim=2)
    return {"q": q, "k": k, "v": v}


def _neox_qkv(model, i, out):
    attn = model.gpt_neox.layers[i].attention  # GPTNeoXAttention.forward
    b, s = out.shape[:2]
    qkv = out.view(b, s, -1, 3 * attn.head_size).transpose(1, 2)
    q, k, v = qkv.chunk(3, dim=-1)  # each (b, heads, s, head_dim)
    return {x: t.transpose(1, 2).reshape(b, s, -1) for x, t in zip("qkv", (q, k, v))}


def _falcon_qkv(model, i, out):
    attn = model.transformer.h[i].self_attention
    b, s = out.shape[:2]
    if hasattr(attn, "_split_heads"):  # transformers <= 5.24: its own split, (b, s, heads, head_dim)
        q, k, v = attn._split_heads(out)
        if attn.new_decoder_architecture:  # k and v come back broadcast to q's heads: one per kv group
            group = attn.num_heads // attn.num_kv_heads
            k, v = k[:, :, ::group], v[:, :, ::group]
    else:  # transformers >= 5.25 split inline in FalconAttention.forward; these lines are its lines
        fused = out.view(b, s, -1, attn.head_dim)
        if attn.new_decoder_architecture:  # [..., kv heads, queries per group + 2, head_dim]
            grouped = fused.view(b, s, attn.num_kv_heads, -1, attn.head_dim)
            q, k, v = grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :]
        elif attn.multi_query:
            q, k, v = fused.split([attn.num_heads, 1, 1], dim=-2)
        else:  # query, key and value interleaved per head
            q, k, v = fused.unflatten(-2, (attn.num_heads, 3)).unbind(-2)
    return {x: t.reshape(b, s, -1) for x, t in zip("qkv", (q, k, v))}


@dataclass(frozen=True)
class FusedCase:
    family: str
    tensor: str  # stored name, "{i}" = layer
    module: Callable[[torch.nn.Module, int], torch.nn.Module]
    split: Callable[[torch.nn.Module, int, torch.Tensor], dict[str, torch.Tensor]]
    kind: str  # "qkv" or "gate_up"

    def expected_rows(self) -> dict[str, int]:
        f = FAMILIES[self.family]
        if self.kind == "gate_up":
            inter = f.config["shared_intermediate_size" if ".shared_mlp." in self.tensor else "intermediate_size"]
            return {"gate": inter, "up": inter}
        return {"q": f.num_heads * f.head_dim, "k": f.num_kv_heads * f.head_dim, "v": f.num_kv_heads * f.head_dim}


FUSED_CASES = [
    FusedCase("phi3", "model.layers.{i}.self_attn.qkv_proj.weight",
              lambda m, i: m.model.layers[i].self_attn.qkv_proj, _phi3_qkv, "qkv"),
    FusedCase("phi3", "model.layers.{i}.mlp.gate_up_proj.weight",
              lambda m, i: m.model.layers[i].mlp.gate_up_proj, _phi3_gate_up, "gate_up"),
    FusedCase("gpt2", "transformer.h.{i}.attn.c_attn.weight",
              lambda m, i: m.transformer.h[i].attn.c_attn, _gpt2_c_attn, "qkv"),
    FusedCase("gpt_neox", "gpt_neox.layers.{i}.attention.query_key_value.weight",
              lambda m, i: m.gpt_neox.layers[i].attention.query_key_value, _neox_qkv, "qkv"),
    *[FusedCase(fam, "transformer.h.{i}.self_attention.query_key_value.weight",
                lambda m, i: m.transformer.h[i].self_attention.query_key_value, _falcon_qkv, "qkv")
      for fam in ("falcon", "falcon_new", "falcon_interleaved")],
    # GraniteMoeSharedMLP.forward: input_linear(x).chunk(2, dim=-1) -> gate, up (same split as Phi-3)
    FusedCase("granitemoeshared", "model.layers.{i}.shared_mlp.input_linear.weight",
              lambda m, i: m.model.layers[i].shared_mlp.input_linear, _phi3_gate_up, "gate_up"),
]


def _fused_param(case: FusedCase):
    return pytest.param(case, id=f"{case.family}-{case.kind}")


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("case", [_fused_param(c) for c in FUSED_CASES])
def test_fused_split_rows_reproduce_the_models_own_split(zoo, case, layer):
    built = zoo.get(case.family)
    ckpt = open_checkpoint(built.base_dir)
    tensor = case.tensor.format(i=layer)
    spec = _specs(ckpt)[tensor]
    stored = ckpt.load(tensor).to(torch.float32)
    weight = stored.T if spec.transpose else stored  # (out, in), docs/definitions.md
    expected_rows = case.expected_rows()

    assert [p.suffix for p in spec.parts] == list(expected_rows)
    assert {p.suffix: len(p.rows) for p in spec.parts} == expected_rows
    all_rows = torch.cat([p.rows for p in spec.parts])
    assert torch.equal(all_rows.sort().values, torch.arange(weight.shape[0])), "parts must partition the rows"

    fused = case.module(built.model, layer)
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(INPUT_SEED))
    with torch.no_grad():
        linear_out = fused(x) - fused(torch.zeros_like(x))  # drop the bias: only x @ Wᵀ is compared
        reference = case.split(built.model, layer, linear_out)
    for part in spec.parts:
        got = x @ weight[part.rows].T
        torch.testing.assert_close(got, reference[part.suffix], rtol=FORWARD_RTOL, atol=FORWARD_ATOL,
                                   msg=lambda m: f"{tensor}:{part.suffix}: {m}")


def test_gpt2_conv1d_storage_is_transposed(zoo):
    specs = _specs(open_checkpoint(zoo.get("gpt2").base_dir))
    conv1d = [n for n in specs if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", n)]
    assert len(conv1d) == 8
    assert all(specs[n].transpose for n in conv1d)
    assert not any(s.transpose for n, s in specs.items() if n not in conv1d)


# ---------------------------------------------------------------------------------------------
# 4b. Stacked 3-D experts: orientation and gate/up split reproduce the model's own forward
#     (stored (experts, in, out): Llama-4: bmm + chunk; gpt-oss: x @ W[e] + interleaved gate/up;
#     stored (experts, out, in) outside ``experts``: Granite-MoE: F.linear + chunk)
# ---------------------------------------------------------------------------------------------


class _Calls(TorchFunctionMode):
    """Records ``(func name, args, result)`` of every torch call made inside the block, so that the
    modeling code's own intermediate tensors (its gate and up, its down input) can be read back."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, object]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((getattr(func, "__name__", str(func)), args, out))
        return out

    def named(self, name: str) -> list[tuple[tuple, object]]:
        return [(a, o) for n, a, o in self.calls if n == name]


def _llama4_expert_io(model, i: int, x: torch.Tensor) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per expert: part -> (input, output of that part) as Llama4TextExperts.forward computes them.

    Llama4TextMoe.forward feeds the experts ``hidden_states.repeat(num_experts, 1)``; the experts run
    ``gate, up = torch.bmm(x, gate_up_proj).chunk(2, dim=-1)`` and ``torch.bmm(up * act(gate), down_proj)``.
    """
    experts = model.model.layers[i].feed_forward.experts
    with torch.no_grad(), _Calls() as rec:
        experts(x.repeat(experts.num_experts, 1))
    ((_, (gate, up)),) = rec.named("chunk")
    (x3, _), _ = rec.named("bmm")[0]
    _, ((h, _), out) = rec.named("bmm")
    return {e: {"gate": (x3[e], gate[e]), "up": (x3[e], up[e]), "down": (h[e], out[e])}
            for e in range(experts.num_experts)}


def _gpt_oss_expert_io(model, i: int, x: torch.Tensor) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per expert: part -> (input, output without bias), from GptOssExperts' eager forward with every
    token routed to that expert: ``gate_up = x @ gate_up_proj[e] + bias``, then
    ``gate, up = gate_up[..., ::2], gate_up[..., 1::2]`` (in ``_apply_gate``), ``h @ down_proj[e] + bias``.
    The biases are removed by subtracting the same forward at x = 0."""
    experts = model.model.layers[i].mlp.experts
    eager = type(experts).forward.__wrapped__  # the modeling code's loop, not a grouped-mm kernel
    res = {}
    for e in range(experts.num_experts):
        parts = []
        for inp in (x, torch.zeros_like(x)):
            idx, weights = torch.full((len(inp), 1), e), torch.ones(len(inp), 1)
            with torch.no_grad(), _Calls() as rec:
                eager(experts, inp, idx, weights)
            gate_up = next(o for a, o in rec.named("add") if a[0] is rec.named("matmul")[0][1])
            gate, up = (o for a, o in rec.named("__getitem__") if a[0] is gate_up)  # source order: gate, up
            (h, _), down = rec.named("matmul")[1]
            parts.append({"gate": gate, "up": up, "h": h, "down": down})
        (px, p0) = parts
        res[e] = {"gate": (x, px["gate"] - p0["gate"]), "up": (x, px["up"] - p0["up"]), "down": (px["h"], px["down"])}
    return res


def _granite_moe_expert_io(model, i: int, x: torch.Tensor) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per expert: part -> (input, output), from GraniteMoeExperts' eager forward (the same code in
    -shared and -hybrid) with every token routed to that expert:
    ``gate, up = F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)``, ``F.linear(h, down_proj[e])``."""
    experts = model.model.layers[i].block_sparse_moe.experts
    eager = type(experts).forward.__wrapped__  # the modeling code's loop, not a grouped-mm kernel
    res = {}
    for e in range(experts.num_experts):
        idx, weights = torch.full((len(x), 1), e), torch.ones(len(x), 1)
        with torch.no_grad(), _Calls() as rec:
            eager(experts, x, idx, weights)
        ((inp, _), _), ((h, _), down) = rec.named("linear")
        ((_, (gate, up)),) = rec.named("chunk")
        res[e] = {"gate": (inp, gate), "up": (inp, up), "down": (h, down)}
    return res


#: family -> (stored gate_up name, stored down name, per-expert io); "{i}" = layer.
_GRANITE_IO = ("model.layers.{i}.block_sparse_moe.input_linear.weight",
               "model.layers.{i}.block_sparse_moe.output_linear.weight", _granite_moe_expert_io)
STACKED_IO = {
    "llama4": ("model.layers.{i}.feed_forward.experts.gate_up_proj", "model.layers.{i}.feed_forward.experts.down_proj",
               _llama4_expert_io),
    "gpt_oss": ("model.layers.{i}.mlp.experts.gate_up_proj", "model.layers.{i}.mlp.experts.down_proj", _gpt_oss_expert_io),
    "granitemoe": _GRANITE_IO, "granitemoeshared": _GRANITE_IO, "granitemoehybrid": _GRANITE_IO,
}
#: Families whose stacks are stored (experts, in, out) and must be transposed.
STACKED_IN_OUT = ("llama4", "gpt_oss")


def _oriented(spec: MatrixSpec, w: torch.Tensor) -> torch.Tensor:
    """One expert's stored matrix as docs/definitions.md's (out, in) (a view of ``w``)."""
    return w.T if spec.transpose else w


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", STACKED_FAMILIES + FORWARD_ONLY_FAMILIES)
def test_stacked_expert_parts_reproduce_the_models_own_forward(zoo, name, layer):
    built = zoo.get(name)
    ckpt = open_checkpoint(built.base_dir)
    specs = _specs(ckpt)
    gate_up_name, down_name, expert_io = STACKED_IO[name]
    gate_up, down = specs[gate_up_name.format(i=layer)], specs[down_name.format(i=layer)]
    in_out = name in STACKED_IN_OUT
    assert gate_up.transpose == down.transpose == in_out and not gate_up.note and not down.note
    assert (gate_up.role, down.role, gate_up.layer, down.layer, gate_up.expert) == ("gate_up", "down", layer, layer, None)
    inter = FAMILIES[name].config["intermediate_size"]
    assert [p.suffix for p in gate_up.parts] == ["gate", "up"] and [len(p.rows) for p in gate_up.parts] == [inter] * 2
    assert [p.suffix for p in down.parts] == [""]

    x = torch.randn(7, FAMILIES[name].config["hidden_size"], generator=torch.Generator().manual_seed(INPUT_SEED))
    io = expert_io(built.model, layer, x)
    assert sorted(io) == list(range(N_STACKED_EXPERTS))
    gu_stored, down_stored = ckpt.load(gate_up.name).float(), ckpt.load(down.name).float()
    for e, parts in io.items():
        weights = {p.suffix: _oriented(gate_up, gu_stored[e])[p.rows] for p in gate_up.parts}  # (out, in), docs/definitions.md
        weights["down"] = _oriented(down, down_stored[e])
        for part, (inp, reference) in parts.items():
            torch.testing.assert_close(inp @ weights[part].T, reference, rtol=FORWARD_RTOL, atol=FORWARD_ATOL,
                                       msg=lambda m: f"{name} layer {layer} expert {e} {part}: {m}")


@pytest.mark.parametrize("name", STACKED_FAMILIES)
def test_stacked_expert_update_of_one_part_shows_only_in_that_result(zoo, tmp_path, name):
    """Only the gate (as the model's forward uses it) of expert 2 in layer 1 changes, by a planted
    rank-2 ΔW_gate (inter, hidden): spectra reports exactly that spectrum for ``:e2:gate``, zero
    elsewhere. The stored entries to change are found through the model's own forward: with the
    identity as input, its gate outputs are the gate columns of the stored slice read (in, out)
    ((hidden, 2·inter) as Llama-4 / gpt-oss store it, the transpose of Granite-MoE's (2·inter, hidden))."""
    built = zoo.get(name)
    tensor, _, expert_io = STACKED_IO[name]
    tensor = tensor.format(i=1)
    hidden, inter = FAMILIES[name].config["hidden_size"], FAMILIES[name].config["intermediate_size"]
    state = load_file(built.base_dir / "model.safetensors")
    in_out = (lambda w: w) if name in STACKED_IN_OUT else (lambda w: w.T)  # a view of the stored slice, (in, out)
    stored = in_out(state[tensor][2])  # (hidden, 2·inter)
    gate_out = expert_io(built.model, 1, torch.eye(hidden))[2]["gate"][1]  # (hidden, inter) = stored[:, gate_cols]
    gate_cols = [int(torch.nonzero((stored - gate_out[:, [k]]).abs().amax(0) == 0)[0, 0]) for k in range(inter)]
    assert len(set(gate_cols)) == inter

    g = torch.Generator().manual_seed(21)
    delta_gate = 1e-2 * torch.randn(inter, 2, generator=g) @ torch.randn(2, hidden, generator=g)  # (out, in)
    tuned = dict(state)
    tuned[tensor] = state[tensor].clone()
    in_out(tuned[tensor][2])[:, gate_cols] += delta_gate.T
    (tmp_path / "tuned").mkdir()
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(built.base_dir / "config.json", tmp_path / "tuned" / "config.json")

    result = spectra.diff(str(built.base_dir), str(tmp_path / "tuned"), config=DiffConfig(device="cpu"))
    by_name = {m.name: m for m in result.modules}
    hit = by_name[f"{tensor}:e2:gate"]
    assert (hit.layer, hit.expert, hit.role, hit.shape) == (1, 2, "gate", [inter, hidden])  # the part's role
    s_ref = np.linalg.svd((in_out(tuned[tensor][2])[:, gate_cols].double() - stored[:, gate_cols].double()).T.numpy(),
                          compute_uv=False)
    np.testing.assert_allclose(hit.singular_values[:2], s_ref[:2], rtol=1e-5)
    assert hit.energy_rank["0.99"] == 2
    assert [m.name for m in result.modules if m.fro_norm != 0] == [hit.name]
    assert {f"{tensor}:e{e}:{p}" for e in range(N_STACKED_EXPERTS) for p in ("gate", "up")} <= set(by_name)


# ---------------------------------------------------------------------------------------------
# 5. End to end: spectra.diff against a float64 numpy reference
# ---------------------------------------------------------------------------------------------


_SUFFIXES_BY_ROLE = {"qkv": ["q", "k", "v"], "gate_up": ["gate", "up"]}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_diff_gives_one_result_per_part_matching_numpy(zoo, name):
    built = zoo.get(name)
    result = spectra.diff(str(built.base_dir), str(built.tuned_dir), config=DiffConfig(device="cpu"))
    base, tuned = open_checkpoint(built.base_dir), open_checkpoint(built.tuned_dir)
    specs = _specs(tuned)

    by_name = {m.name: m for m in result.modules}
    assert len(by_name) == len(result.modules), "duplicate result names"

    def experts(t: str) -> list[str]:  # a 3-D stack gives one result per expert, "<tensor>:e<k>"
        return [f":e{e}" for e in range(N_STACKED_EXPERTS)] if len(tuned.tensors[t].shape) == 3 else [""]

    expected_names = {t + e + (f":{s}" if s else "") for t, spec in specs.items() for e in experts(t)
                      for s in _SUFFIXES_BY_ROLE.get(spec.role, [""])}
    assert set(by_name) == expected_names

    compared = 0
    for m in result.modules:
        tensor, _, suffix = m.name.partition(":")
        stacked = re.match(r"e(\d+)(?::|$)", suffix)
        expert = int(stacked.group(1)) if stacked else specs[tensor].expert
        if stacked:
            suffix = suffix[stacked.end():]
        spec = specs[tensor]
        # a part of a fused matrix has its own role (c_attn:v is a "v"), the rest the matrix's
        assert (m.layer, m.expert, m.role) == (spec.layer, expert, suffix if suffix in ("q", "k", "v", "gate", "up") else spec.role)
        metrics = [m.fro_norm, m.base_fro_norm, m.rel_norm, m.spectral_norm, m.nuclear_norm, m.stable_rank,
                   m.effective_rank, *m.energy_rank.values(), *m.random_energy_rank.values()]
        assert all(v is not None and math.isfinite(v) for v in metrics), m

        delta = (tuned.load(tensor).to(torch.float32).double() - base.load(tensor).to(torch.float32).double())
        if stacked:
            delta = delta[expert]
        if spec.transpose:
            delta = delta.T
        if suffix:
            delta = delta[next(p.rows for p in spec.parts if p.suffix == suffix)]
        assert m.shape == list(delta.shape)
        delta_np = delta.numpy()
        assert m.fro_norm == pytest.approx(np.linalg.norm(delta_np), rel=NORM_RTOL)
        k, clear = reference_energy_rank(delta_np, 0.9)
        if clear:
            assert m.energy_rank["0.9"] == k, m.name
            compared += 1
    assert compared >= MIN_COMPARED_FRACTION * len(result.modules)


# ---------------------------------------------------------------------------------------------
# 6. `spectra inspect` lists the split parts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, tensor, parts", [
    pytest.param("phi3", "model.layers.1.self_attn.qkv_proj.weight", ["q", "k", "v"], id="phi3-qkv"),
    pytest.param("phi3", "model.layers.1.mlp.gate_up_proj.weight", ["gate", "up"], id="phi3-gate_up"),
    pytest.param("falcon_new", "transformer.h.1.self_attention.query_key_value.weight", ["q", "k", "v"], id="falcon_new"),
    pytest.param("gpt2", "transformer.h.1.attn.c_attn.weight", ["q", "k", "v"], id="gpt2"),
])
def test_inspect_cli_lists_the_split_parts(zoo, name, tensor, parts):
    folder = str(zoo.get(name).base_dir)
    runner = CliRunner()

    as_json = runner.invoke(main, ["inspect", "--json", folder], catch_exceptions=False)
    assert as_json.exit_code == 0, as_json.output
    records = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert records[tensor]["parts"] == parts

    table = runner.invoke(main, ["inspect", folder], env={"COLUMNS": "400"}, catch_exceptions=False)
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if tensor in line)
    assert ",".join(parts) in row


# ---------------------------------------------------------------------------------------------
# 7. Routers stored (in, out): ERNIE-4.5-VL transposes mlp.gate.weight(_1) on load; ERNIE-4.5 MoE
#    does not
# ---------------------------------------------------------------------------------------------


#: ERNIE-4.5-VL-MoE: layer 0 dense, layer 1 MoE with 4 text and 4 vision experts. head_dim 16 with
#: an mrope section (3, 3, 2) that fits it (the default one needs head_dim 128).
_ERNIE_TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, moe_k=2, moe_num_experts=4, mlp_layer_types=["dense", "sparse"],
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]})


def _save_tiny(tmp_path, model_type: str, model_cls: str, **config):
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls).from_config(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    return model, open_checkpoint(tmp_path / "base")


def test_ernie4_5_vl_routers_stored_in_out_are_transposed(tmp_path):
    """Ernie4_5_VLMoeMoeTopKRouter computes ``F.linear(x, weight)`` with ``weight`` (experts, hidden);
    the checkpoint stores ``mlp.gate.weight`` (text experts) and ``mlp.gate.weight_1`` (vision
    experts) as (hidden, experts), transposed on load. Oriented, each reproduces the router's logits,
    and a change to one shows as an (experts, hidden) result matching numpy."""
    model, ckpt = _save_tiny(tmp_path, "ernie4_5_vl_moe", "AutoModelForImageTextToText",
                             text_config={**_ERNIE_TEXT, "moe_intermediate_size": [16, 8], "moe_num_shared_experts": 1},
                             vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64))
    specs = _specs(ckpt)
    hidden, n_exp = 64, 4
    mlp = model.model.language_model.layers[1].mlp
    x = torch.randn(7, hidden, generator=torch.Generator().manual_seed(INPUT_SEED))
    for stored_name, router in (("model.layers.1.mlp.gate.weight", mlp.text_moe.gate),
                                ("model.layers.1.mlp.gate.weight_1", mlp.vision_moe.gate)):
        spec = specs[stored_name]
        assert ckpt.tensors[stored_name].shape == (hidden, n_exp)
        assert (spec.role, spec.layer, spec.transpose) == ("router", 1, True), spec
        with torch.no_grad():
            logits = router(x)[0]
        weight = _oriented(spec, ckpt.load(stored_name).float())  # (experts, hidden)
        torch.testing.assert_close(x @ weight.T, logits, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)
    # Every other 2-D weight of the language model is (out, in) already.
    assert [n for n, s in specs.items() if s.transpose] == ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.weight_1"]

    state = load_file(tmp_path / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    delta = 1e-2 * torch.randn(n_exp, 1, generator=g) @ torch.randn(1, hidden, generator=g)  # (out, in), rank 1
    tuned = {**state, "model.layers.1.mlp.gate.weight_1": state["model.layers.1.mlp.gate.weight_1"] + delta.T}
    (tmp_path / "tuned").mkdir()
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "tuned" / "config.json")
    result = spectra.diff(str(tmp_path / "base"), str(tmp_path / "tuned"), config=DiffConfig(device="cpu"))
    changed = [m for m in result.modules if m.fro_norm != 0]
    assert [m.name for m in changed] == ["model.layers.1.mlp.gate.weight_1"]
    assert (changed[0].role, changed[0].shape) == ("router", [n_exp, hidden])
    s_ref = np.linalg.svd((tuned["model.layers.1.mlp.gate.weight_1"].double()
                           - state["model.layers.1.mlp.gate.weight_1"].double()).T.numpy(), compute_uv=False)
    np.testing.assert_allclose(changed[0].singular_values[:1], s_ref[:1], rtol=1e-5)
    skipped = {s["name"]: s["reason"] for s in result.skipped}
    # (2, experts): the text and vision routers' score corrections, not a matrix nor per expert
    assert skipped["model.layers.1.mlp.moe_statics.e_score_correction_bias"] == "2-D bias, not a weight matrix"


def test_ernie4_5_moe_router_is_stored_out_in(tmp_path):
    """ERNIE-4.5 MoE (text) stores mlp.gate.weight (experts, hidden) as its router uses it
    (``F.linear``, no transpose in transformers' conversion mapping): left as stored."""
    model, ckpt = _save_tiny(tmp_path, "ernie4_5_moe", "AutoModelForCausalLM",
                             **{k: v for k, v in _ERNIE_TEXT.items() if k not in ("mlp_layer_types", "rope_parameters")},
                             moe_intermediate_size=16, moe_num_shared_experts=0, moe_layer_start_index=1)
    specs = _specs(ckpt)
    spec = specs["model.layers.1.mlp.gate.weight"]
    assert ckpt.tensors[spec.name].shape == (4, 64)
    assert (spec.role, spec.transpose) == ("router", False)
    assert not any(s.transpose for s in specs.values())
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(INPUT_SEED))
    with torch.no_grad():
        logits = model.model.layers[1].mlp.gate(x)[0]
    torch.testing.assert_close(x @ ckpt.load(spec.name).float().T, logits, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)
