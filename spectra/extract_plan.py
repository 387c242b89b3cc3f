"""What ``spectra extract`` adapts, and its options: the config, the matrices chosen as LoRA targets
(and why others are not), and the per-module rank limits every pass works with.

Pure planning over checkpoint headers and adapter factors: nothing here decomposes a matrix.

What a LoRA target is: a 2-D ``….weight`` of a module PEFT wraps whole. Fused matrices (Phi-3
``qkv_proj``/``gate_up_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) are extracted as the
module PEFT wraps, never split; GPT-2's ``Conv1D`` is oriented ``(out, in)`` like every matrix (PEFT's
``fan_in_fan_out``). Not targets, each reported with its reason: embeddings and the output head
unless asked for (``embeddings``), MoE routers (plain parameters in transformers ≥ 5, which PEFT cannot wrap), matrices whose rows
differ between base and tuned (a resized vocabulary), and tensors that are not a module's ``weight``.
Per-expert 2-D matrices (Mixtral's ``experts.N.w1``) share one rank: transformers ≥ 5 fuses them on
load and PEFT converts such an adapter only when they all have its global ``r``. The experts of a 3-D stack
(gpt-oss's ``experts.gate_up_proj``) are one target each, in that shared rank too, written as PEFT's
``target_parameters`` LoRA of the whole stack (:mod:`spectra.extract_write`). Modules PEFT would
drop on load (:mod:`spectra.peft_moe`: per-expert LoRAs of a model type PEFT does not convert,
dense MLPs named like the experts of one it does) are not targets either, nor a task head PEFT stores whole
(SEQ_CLS's ``classifier``, :mod:`spectra.extract_heads`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from spectra.allocation import allocate
from spectra.config import SharedOptions
from spectra.errors import ConfigError
from spectra.io.checkpoint import FLOAT_DTYPES, Checkpoint
from spectra.io.peft_writer import PEFT_TASK_TYPES, check_task_type
from spectra.lowrank import VLLM_RANKS, Budget, energy_rank_top, parse_budget, rank_levels, round_up
from spectra.metrics import resolved_above, route_resolution
from spectra.naming import MatrixSpec, layer_of
from spectra.pairing import ALIAS_REASON, MatrixPair, Pairing
from spectra.peft_moe import LOAD_TRANSPOSED_EXPERTS, TRANSPOSED_EXPERTS, PeftMoeRules
from spectra.results import caveat_codes
from spectra.selection import Task

#: The storage dtypes an adapter can be written in.
OUT_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: The tied group of per-expert matrices (one rank for all, see the module docstring).
EXPERTS_GROUP = "experts"


#: The words of the budget's spending warning (``extract_results.ExtractResult.nothing_written`` drops it).
SPENT = " parameters spent"

@dataclass(frozen=True)
class ExtractConfig(SharedOptions):
    """Options of ``spectra extract``; saved with the results.

    Attributes:
        rank: ``--rank R``: every module keeps R components (what mergekit's extract-lora does).
        energy: ``--energy τ`` in (0, 1]: each module keeps the smallest rank holding ≥ τ of its
            ‖ΔW‖²_F, its ``energy_rank[τ]`` (the default when no rule is given: τ = 0.9), at most the
            directions above the rounding floor of its stored weights (:func:`resolved_count`).
        budget: ``--budget``: total LoRA parameters (``1200000``, ``1.2M``), a percentage of the
            full update's parameter count (``10%``: of Σ out·in over the chosen matrices that changed, those
            with an update above the rounding level, as ``totals.full_params`` counts them) or a size in the
            output dtype (``50MB``); rank-1 components are spread over the modules to keep the most energy
            (:func:`spectra.allocation.allocate`: the greedy, then the exact optimum).
        max_rank: no module keeps more components than this.
        serving: ``"vllm"``: ranks up to 512, the largest ``max_lora_rank`` vLLM serves (every rank at most that loads;
            vLLM pads each module to it); ``"none"``: any rank. The serving cost (max_lora_rank × modules) is reported either way.
        dtype: storage dtype of the adapter; ``"auto"``: the tuned checkpoint's (bfloat16 for fp8/int8).
        rslora: write an rsLoRA adapter (``alpha = √r``; still scale 1) instead of ``alpha = r``.
        embeddings: also extract embeddings (PEFT's embedding LoRA) and the output head.
        save_modules: keep changed norms and biases: as PEFT ``modules_to_save`` (modules holding only
            1-D tensors) and ``lora_bias`` (biases of adapted modules, when every adapted module has one).
        strategy: ``"one-pass"``: one read and one eigendecomposition per matrix, keeping the top
            singular triplets that can still be chosen (on disk, in the output folder's scratch);
            ``"two-pass"``: singular values first (the engine's exact batched path), then, once the
            ranks are known, a second read for the vectors of the modules that need them; ``"auto"``:
            one-pass, or two-pass when ``eval_text`` needs a uniform adapter under ``energy``.
        approx_above: matrices with min(out, in) above this use the randomized SVD (its residual is
            certified and reported) instead of the exact Gram eigendecomposition; None: never.
        seed: seed of the randomized sketches.
        precision: how ``--rank``'s singular vectors are computed on the CPU. ``"mixed"``: the subspace
            from a float32 Gram eigensolve, then the values and factors in float64 by Rayleigh-Ritz on
            ΔW (:func:`spectra.lowrank.refined_triplets`: energies within ~1e-8 (measured) of float64's, in
            ‖ΔW‖²_F, each value at most the exact one, the residual reported; ~20% less time per
            576-wide matrix);
            ``"float64"``: the exact float64 eigenvectors. ``--energy`` and ``--budget`` need every
            singular value and always compute in float64; so does a GPU.
        task_type: PEFT ``task_type`` of the adapter; ``"auto"``: from the base's ``config.json``.
        top_values: singular values of each module kept in ``extract.json``.
        max_batch_bytes: memory cap of one batch of ΔW; default as ``spectra diff``.
        prefetch: tensor pairs read ahead; default as ``spectra diff``.
        eval_text: a text file: report the held-out loss of base, tuned, base + the adapter and base +
            a uniform-rank adapter of the same size (needs transformers and peft).
        eval_seq_len: tokens per evaluation block.
        eval_blocks: evaluation blocks (the first ones of the text).
    """

    rank: int | None = None
    energy: float | None = None
    budget: str | int | None = None
    max_rank: int | None = None
    serving: Literal["none", "vllm"] = "none"
    dtype: str = "auto"
    rslora: bool = False
    embeddings: bool = False
    save_modules: bool = False
    strategy: Literal["auto", "one-pass", "two-pass"] = "auto"
    approx_above: int | None = 16384
    seed: int = 0
    precision: Literal["mixed", "float64"] = "mixed"
    task_type: str | None = "auto"
    top_values: int = 64
    max_batch_bytes: int | None = None
    prefetch: int | None = None
    eval_text: str | None = None
    eval_seq_len: int = 128
    eval_blocks: int = 32
    parsed_budget: Budget | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [n for n, v in (("--rank", self.rank), ("--energy", self.energy), ("--budget", self.budget)) if v is not None]
        if len(given) > 1:
            raise ConfigError(f"choose one of --rank, --energy and --budget. Got {' and '.join(given)} instead")
        if not given:
            object.__setattr__(self, "energy", 0.9)
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"--rank must be a positive integer. Got {self.rank!r} instead")
        if self.energy is not None and not (0.0 < float(self.energy) <= 1.0):
            raise ConfigError(f"--energy τ must be in (0, 1]. Got {self.energy} instead",
                              hint="τ is the share of each module's ‖ΔW‖² to keep, e.g. 0.9")
        if self.budget is not None:
            try:
                object.__setattr__(self, "parsed_budget", parse_budget(self.budget))
            except ValueError as exc:
                raise ConfigError(f"--{exc}") from None
        if self.max_rank is not None and self.max_rank < 1:
            raise ConfigError(f"--max-rank must be >= 1. Got {self.max_rank} instead")
        if self.rank is not None and self.max_rank is not None and self.rank > self.max_rank:  # one would be ignored
            raise ConfigError(f"--rank {self.rank} is above --max-rank {self.max_rank}: every module would get "
                              f"{self.max_rank}, not the rank asked for", hint="give --rank alone (or a --rank within --max-rank)")
        if self.serving not in ("none", "vllm"):
            raise ConfigError(f"--serving must be none or vllm. Got {self.serving!r} instead")
        if self.dtype != "auto" and self.dtype not in OUT_DTYPES:
            raise ConfigError(f"--dtype must be auto or one of {', '.join(OUT_DTYPES)}. Got {self.dtype!r} instead")
        if self.strategy not in ("auto", "one-pass", "two-pass"):
            raise ConfigError(f"strategy must be auto, one-pass or two-pass. Got {self.strategy!r} instead")
        if self.top_values < 0 or self.eval_seq_len < 2 or self.eval_blocks < 1:
            raise ConfigError(f"top_values must be >= 0, eval_seq_len >= 2 and eval_blocks >= 1. "
                              f"Got {self.top_values}, {self.eval_seq_len}, {self.eval_blocks} instead")
        check_task_type(self.task_type, also=("auto",))
        if self.precision not in ("mixed", "float64"):
            raise ConfigError(f"--precision must be mixed or float64. Got {self.precision!r} instead")
        if self.approx_above is not None and self.approx_above < 1:
            raise ConfigError(f"approx_above must be >= 1 or None. Got {self.approx_above} instead")

    @property
    def mode(self) -> Literal["rank", "energy", "budget"]:
        """Which rank rule applies."""
        return "rank" if self.rank is not None else ("budget" if self.budget is not None else "energy")

    @property
    def resolved_strategy(self) -> Literal["one-pass", "two-pass"]:
        """``strategy`` with ``"auto"`` decided (see the attribute)."""
        if self.strategy != "auto":
            return self.strategy
        return "two-pass" if self.eval_text and self.mode == "energy" else "one-pass"


#: ExtractConfig fields that change what a run computes (a journal is resumed only under the same ones).
RESULT_FIELDS = ("include", "exclude", "layers", "rank", "energy", "budget", "max_rank", "serving", "dtype", "rslora",
                 "embeddings", "save_modules", "strategy", "approx_above", "precision", "seed", "top_values", "eval_text")


@dataclass(frozen=True)
class Target:
    """One matrix extracted as a LoRA module.

    Attributes:
        order: position in the results (the layer order of ``spectra diff``).
        name: its tensor name (the tuned checkpoint's; for an adapter, the base's).
        module: the module path PEFT wraps (``model.layers.0.self_attn.q_proj``).
        label: module label (``q_proj``), layer, role and expert as :mod:`spectra.naming` says.
        shape: ``(out, in)`` of ΔW (embeddings: ``(vocab, dim)``, their stored layout).
        embedding: an ``nn.Embedding`` (written as PEFT's embedding LoRA).
        conv1d: stored ``(in, out)`` (GPT-2 ``Conv1D``): the adapter needs ``fan_in_fan_out``.
        group: the tied-rank group (:data:`EXPERTS_GROUP`), or None.
        base_name: the base checkpoint's tensor name.
        dtype: the tuned side's stored dtype.
        note: caveats from naming and pairing.
        fused_out: ``out`` again for an expert matrix PEFT fuses with another (Mixtral's ``w1`` and ``w3`` into
            ``gate_up_proj``, :attr:`spectra.peft_moe.PeftMoeRules.fused`): it builds their LoRA at rank 2r over both
            outputs, a block-diagonal B holding ``r·out`` more parameters per member; else 0.
        components: the most nonzero singular values ΔW can have when fewer than ``p``: a LoRA module's rank
            when an adapter is resized (its factors hold no more); 0: ``p``.
        stack: for expert ``expert`` of a 3-D stack, the stack's number of experts (``module`` is then the stored
            parameter's name, ``model.layers.0.mlp.experts.gate_up_proj``); 0 for a module's own matrix.
        flip: PEFT's LoRA of the stack holds ΔWᵀ: its experts module says ``is_transposed`` where spectra reads the
            stored matrix as is, or the reverse (:func:`stack_flip`).
    """

    order: int
    name: str
    module: str
    label: str
    layer: int | None
    role: str | None
    expert: int | None
    shape: tuple[int, int]
    embedding: bool
    conv1d: bool
    group: str | None
    base_name: str | None
    dtype: str
    note: str = ""
    fused_out: int = 0
    components: int = 0
    stack: int = 0
    flip: bool = False

    @property
    def p(self) -> int:
        return min(self.shape)

    @property
    def cap(self) -> int:
        """The most components a rank of this module can hold: ``p``, or fewer (:attr:`components`)."""
        return min(self.p, self.components) if self.components else self.p

    @property
    def cost(self) -> int:
        """LoRA parameters per component, as PEFT builds them: one column of B and one row of A, ``out + in``
        (plus :attr:`fused_out`)."""
        return self.shape[0] + self.shape[1] + self.fused_out


#: Module names given to ``nn.Embedding`` layers in transformers' modeling code that neither a role nor
#: "emb" in the name gives away (a scan of ``self.<name> = nn.Embedding(`` in transformers 5.24, names
#: other modules also use left out): T5's relative position buckets, SAM-style learned tokens. PEFT
#: wraps them as embedding LoRAs and ignores a linear LoRA's ``lora_A``/``lora_B`` for them on load.
EMBEDDING_LEAVES = frozenset({
    "relative_attention_bias", "global_relative_attention_bias", "shared", "wte", "wpe", "mask_tokens", "iou_token",
    "obj_score_token", "hq_token", "presence_token", "audio_bos_eos_token", "bias_values", "codebook", "prompt_ctx",
    "queries_features", "query_feat", "query_768_resolution", "query_1024_resolution", "recycle_disto",
})
#: Module names with "emb" in them that transformers gives only to ``nn.Linear`` / ``nn.Conv*`` layers (the same
#: scan, for ``nn.Linear``, ``nn.Conv1d/2d/3d`` and GPT-2's ``Conv1D``): ALBERT's
#: ``embedding_hidden_mapping_in``, ``embedding_projection``, ``patch_embed``... PEFT wraps them as linear
#: LoRAs, so writing them as embedding LoRAs would be dropped on load.
LINEAR_EMB_LEAVES = frozenset(x.lower() for x in (
    "box_linear_embeddings", "class_embed", "decoder_embed", "decoder_embeddings", "embed_out", "embed_proj",
    "embedding_convPxP", "embedding_hidden_mapping_in", "embedding_proj_layer", "embedding_projection",
    "embedding_transformation", "embeddings_project", "entity_embedding_dense", "inner2emb", "inputs_embeds_projector",
    "patch_embed", "patch_embedding", "patch_embedding_projection", "patch_embeddings", "predictor_embeddings",
    "relative_pos_embeddings", "speaker_embeds_layer", "token_embedding_projection", "unembedding_projection",
    "vision_embed_tokens", "xpath_unitseq2_embeddings"))


def is_embedding_name(name: str, role: str | None) -> bool:
    """Whether the stored weight ``name`` (``<module>.weight``) of cross-architecture ``role`` is an
    ``nn.Embedding``'s: token/position embeddings by role; one of :data:`EMBEDDING_LEAVES` or CTRL's token
    table ``transformer.w``; otherwise a module named ``…emb…`` (BERT's ``token_type_embeddings``,
    GPT-NeoX's ``embed_in``, ``rel_pos_emb``) unless transformers names only linear layers so
    (:data:`LINEAR_EMB_LEAVES`), and never the output head.

    >>> is_embedding_name("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None)
    True
    >>> is_embedding_name("transformer.w.weight", None), is_embedding_name("transformer.h.0.ffn.0.weight", None)
    (True, False)
    >>> is_embedding_name("albert.encoder.embedding_hidden_mapping_in.weight", None)
    False
    """
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    leaf = module.rpartition(".")[2].lower()
    if role in ("embed", "pos_embed"):
        return True
    if role == "head" or leaf in LINEAR_EMB_LEAVES:
        return False
    return leaf in EMBEDDING_LEAVES or module.lower() == "transformer.w" or "emb" in leaf


def is_embedding(spec: MatrixSpec) -> bool:
    """An ``nn.Embedding`` weight (:func:`is_embedding_name`)."""
    return is_embedding_name(spec.name, spec.role)


#: Why an adapter's LoRA on a 3-D expert stack is not extracted (a full checkpoint's stacks are).
STACK_NOT_WRITTEN = ("a target_parameters LoRA on a 3-D expert stack: spectra extract writes such LoRAs from full checkpoints, "
                     "it does not resize them")


def stack_flip(spec: MatrixSpec, model_type: str | None, shape: tuple[int, ...] = ()) -> bool:
    """Whether PEFT's LoRA on the 3-D stack ``spec`` holds the transpose of spectra's ``(out, in)`` ΔW: PEFT's update of
    an expert is the stored matrix, or its transpose where the experts module says ``is_transposed``
    (:data:`spectra.peft_moe.TRANSPOSED_EXPERTS`), and spectra reads the stored matrix transposed where ``spec.transpose``;
    never where transformers transposes the stored stack (``shape``) on load (:data:`~spectra.peft_moe.LOAD_TRANSPOSED_EXPERTS`:
    the factors were written for the stored orientation, and PEFT refused them, "size mismatch"), which it does only when
    the stored shape differs from the module's (``Transpose(check_dims=True)``): a square stack is loaded as stored."""
    if (model_type or "") in LOAD_TRANSPOSED_EXPERTS and len(shape) == 3 and shape[1] != shape[2]:
        return False
    return ((model_type or "") in TRANSPOSED_EXPERTS) != spec.transpose


def why_not_target(spec: MatrixSpec, stored_shape: tuple[int, ...], config: ExtractConfig, *,
                   rows_differ: bool = False, rules: PeftMoeRules | None = None) -> str | None:
    """Why a paired matrix is not extracted as a LoRA module, or None when it is (module docstring).

    ``rules``: what PEFT drops on a model of the base's type (:func:`spectra.peft_moe.peft_moe_rules`);
    a module PEFT would drop on load is not extracted, so that no number claims what the adapter
    does not hold once loaded."""
    if len(stored_shape) == 3:  # written as PEFT's target_parameters LoRA on the stack: a parameter, any name
        return None if spec.role != "router" else "MoE router: a plain parameter, which PEFT cannot wrap"
    if not spec.name.endswith(".weight"):
        return "not a module's weight (PEFT wraps modules whose matrix is named <module>.weight)"
    if spec.role == "router":
        return "MoE router: transformers >= 5 implements routers as plain parameters, which PEFT cannot wrap"
    if rows_differ:
        return "rows differ between base and tuned (a resized vocabulary): a LoRA cannot add rows to the base"
    if (is_embedding(spec) or spec.role == "head") and not config.embeddings:
        what = "output head" if spec.role == "head" else "embedding"
        return f"{what}: pass --embeddings to extract it (as PEFT's {'embedding ' if what == 'embedding' else ''}LoRA)"
    if rules is not None:
        return rules.why_dropped(spec.name[: -len(".weight")], spec.expert)
    return None


def target_of(order: int, spec: MatrixSpec, module: str, shape: tuple[int, int], *, base_name: str | None,
              dtype: str, note: str = "", rules: PeftMoeRules | None = None, unit: tuple[str, int, int, bool] | None = None) -> Target:
    """The :class:`Target` of a chosen matrix (``rules``: the base's :class:`PeftMoeRules`, for PEFT's fused experts;
    ``unit``: ``(name, expert, experts, flip)`` of one expert of a 3-D stack, :attr:`Target.stack`)."""
    if unit is not None:
        name, expert, stack, flip = unit
        return Target(order=order, name=name, module=module, label=spec.module, layer=spec.layer, role=spec.role, expert=expert,
                      shape=(int(shape[0]), int(shape[1])), embedding=False, conv1d=False, group=EXPERTS_GROUP,
                      base_name=base_name, dtype=dtype, note=note, stack=stack, flip=flip)
    fused = rules is not None and bool(rules.converted) and spec.expert is not None and module.rpartition(".")[2] in rules.fused
    return Target(order=order, name=spec.name, module=module, label=spec.module, layer=spec.layer, role=spec.role,
                  expert=spec.expert, shape=(int(shape[0]), int(shape[1])), embedding=is_embedding(spec),
                  conv1d=spec.transpose, group=EXPERTS_GROUP if spec.expert is not None else None,
                  base_name=base_name, dtype=dtype, note=note, fused_out=int(shape[0]) if fused else 0)


def module_of(pair: MatrixPair, prefix: str = "") -> str:
    """The module path a LoRA extracted from ``pair`` adapts, in the base checkpoint's names: the adapter is
    loaded onto the base model, so the prefix of a tuned copy saved through a wrapper (DDP's ``module.``,
    a LightningModule's ``model.``) must not reach it. A tuned head paired with a tied base's embedding
    keeps its own name (the base model has that head, tied), less ``prefix``, the tuned names' wrapper
    prefix (found from the modules both sides name)."""
    if pair.base.role == pair.tuned.role and pair.base.name.endswith(".weight"):
        return pair.base.name[: -len(".weight")]
    return pair.tuned.name.removeprefix(prefix)[: -len(".weight")]


def one_side_only(pairing: Pairing, base: Checkpoint, tuned: Checkpoint, keep: Callable[[str, int | None], bool],
                  head: Callable[[str, str], bool]) -> list[str]:
    """The warning, as a one-item list (else empty), for the weight matrices (floating, 2-D or a 3-D stack, named as
    weights; quantisation scales and buffers aside) that only one checkpoint holds among those ``keep`` selects, task
    heads (``head(side, name)``) aside: a layer the fine-tune added or removed, whose update no adapter holds
    (extract.json lists them under ``unmatched``)."""
    def matrices(ck: Checkpoint, names: list[str]) -> list[str]:
        aux = {x for w in ck.scales.values() for x in (w.scale, w.zero_point) if x}  # quantisation scales, zero points
        return [n for n in names if n in ck.specs and n not in aux and len(ck.tensors[n].shape) in (2, 3)
                and ck.tensors[n].dtype in FLOAT_DTYPES]

    alone = [f"{side}-only {n}" for side, names, ck in (("base", pairing.base_only, base), ("tuned", pairing.tuned_only, tuned))
             for n in matrices(ck, names) if keep(n, layer_of(n)) and not head(side, n)]
    many = len(alone) > 1
    return [f"{len(alone)} weight matri{'ces are' if many else 'x is'} in one checkpoint only (e.g. {alone[0]}): "
            f"the adapter holds no update of {'them' if many else 'it'} (extract.json \"unmatched\")"] if alone else []


@dataclass
class RankPlan:
    """Per-target rank limits, in the order of the targets.

    Attributes:
        levels: the ranks each target may take (:func:`spectra.lowrank.rank_levels`), ascending.
        caps: the largest of them (with a budget, also at most budget / (out + in)).
        groups: tied group -> target indices.
        budget: the budget in parameters (``budget`` rule only). A percentage is of the matrices that
            changed, known only once their spectra are: until :func:`settle_budget`, it is of every target
            (an upper bound, so the first pass keeps every component the settled budget can choose).
        uniform_bound: components each module keeps beyond its own rank so that a uniform adapter of
            the same size can be built (``eval_text``), or 0.
    """

    levels: list[list[int]]
    caps: list[int]
    groups: dict[str, list[int]]
    budget: int | None = None
    uniform_bound: int = 0


def plan_ranks(targets: list[Target], config: ExtractConfig, bytes_per_param: int) -> RankPlan:
    """Rank limits of each target, and the up-front checks of the rank rule.

    Raises:
        ConfigError: ``--rank`` above min(out, in) of a module (naming the smallest), or a budget
            below the cheapest component of the chosen modules (naming it).
    """
    levels = _rank_levels(targets, config)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        if t.group:
            groups.setdefault(t.group, []).append(i)
    budget = None
    uniform_bound = 0
    if config.mode == "rank":
        want = min(config.rank, config.max_rank) if config.max_rank else config.rank
        small = min(targets, key=lambda t: t.p)
        if config.serving == "vllm" and want > VLLM_RANKS[-1]:
            raise ConfigError(f"--rank {want} is above {VLLM_RANKS[-1]}, the largest max_lora_rank vLLM serves",
                              hint=f"choose --rank <= {VLLM_RANKS[-1]}, or drop --serving vllm")
        if want > small.p:
            raise ConfigError(
                f"--rank {config.rank} is above min(out, in) = {small.p} of {small.name} ({small.shape[0]}×{small.shape[1]})",
                hint=f"choose --rank <= {small.p}, or leave such modules out with --exclude")
        levels = [[want] for _ in levels]
        uniform_bound = want if config.eval_text else 0
    elif config.mode == "budget":
        # a percentage of every target here: the changed ones are known after the spectra (settle_budget)
        full = sum(t.shape[0] * t.shape[1] for t in targets)
        budget, levels, uniform_bound = _budget_levels(targets, levels, config.parsed_budget.params(full, bytes_per_param),
                                                       range(len(targets)), config)
    caps = [lv[-1] if lv else 0 for lv in levels]
    return RankPlan(levels, caps, groups, budget, uniform_bound)


def _rank_levels(targets: list[Target], config: ExtractConfig) -> list[list[int]]:
    """The ranks each target may take before any budget (:func:`spectra.lowrank.rank_levels`: ``--max-rank``,
    ``--serving``), ascending."""
    serving = "vllm" if config.serving == "vllm" else None
    return [rank_levels(t.p, config.max_rank, serving) for t in targets]


def _budget_levels(targets: list[Target], levels: list[list[int]], budget: int, among: Iterable[int],
                   config: ExtractConfig) -> tuple[int, list[list[int]], int]:
    """``(budget, levels, uniform_bound)``: each target's ranks cut to those whose cost fits ``budget`` parameters,
    and the uniform rank it affords (``eval_text``).

    Raises:
        ConfigError: the budget is below the cheapest component of the targets ``among`` (indices).
    """
    among = list(among)
    c = min(among, key=lambda i: levels[i][0] * targets[i].cost)
    need = levels[c][0] * targets[c].cost
    if budget < need:
        raise ConfigError(
            f"--budget {config.budget} is {budget:,} LoRA parameter{'s' if budget != 1 else ''}, below the cheapest component of the chosen "
            f"modules ({need:,} for rank {levels[c][0]} of {targets[c].name})",
            hint="raise the budget, or choose fewer or smaller modules with --include/--exclude")
    cut = [[v for v in lv if v * t.cost <= budget] for lv, t in zip(levels, targets)]
    return budget, cut, budget // sum(targets[i].cost for i in among) if config.eval_text else 0


def settle_budget(plan: RankPlan, targets: list[Target], config: ExtractConfig, spectra: dict[int, dict],
                  bytes_per_param: int) -> RankPlan:
    """The plan of a percentage budget once every target's spectrum is journaled: the percentage of the full
    update, Σ out·in over the targets that changed (:func:`extractable`: a nonzero update above the rounding
    level; ``totals.full_params`` and ``spectra recommend`` count the same), not of every target. Frozen
    matrices held no update, so counting them raised the budget (10% of a half-frozen model bought 20% of
    its update). Other budgets, and a selection where nothing changed, keep ``plan``.

    Raises:
        ConfigError: the settled budget is below the cheapest component of the changed modules.
    """
    changed = [i for i in range(len(targets)) if not spectra[i].get("skipped") and extractable(spectra[i])]
    if config.mode != "budget" or config.parsed_budget.kind != "fraction" or not changed:
        return plan
    full = sum(targets[i].shape[0] * targets[i].shape[1] for i in changed)
    budget, levels, uniform_bound = _budget_levels(targets, _rank_levels(targets, config),
                                                   config.parsed_budget.params(full, bytes_per_param), changed, config)
    return RankPlan(levels, [lv[-1] if lv else 0 for lv in levels], plan.groups, budget, uniform_bound)


def common_exp(spectra: Iterable[dict]) -> int:
    """The largest ``exp`` of the journaled spectra with energy (:class:`spectra.extract_io.ExtractRun`: S
    and total are of ``ΔW·2**-exp``): the unit ``4**exp`` in which modules' energies are compared."""
    return max((int(s.get("exp", 0)) for s in spectra if not s.get("skipped") and float(s["total"]) > 0), default=0)


def noise_level(spec: dict, p: int) -> float:
    """The level at or below which a journaled singular value of a ``p = min(out, in)`` matrix is not the update (in
    the spectrum's own unit, ``2**exp``): its rounding floor (``floor``, journaled under a budget) or its route's
    resolution (:func:`spectra.metrics.route_resolution` by the journaled ``method``: the float64 Gram route's
    σ₁·√(p·ε)), whichever is higher. An exactly rank-1 float64 update showed values of 3e-8·σ₁ there (the Gram route's
    rounding), above its 1e-16 storage floor: a budget bought them."""
    level = max(float(spec.get("floor", 0.0)), 0.0)
    S = spec.get("S") or []
    return max(level, route_resolution(float(max(S)), p, spec.get("method"))) if len(S) else level


def energies(spec: dict, ref: int, n: int | None, p: int) -> np.ndarray:
    """The first ``n`` σᵢ² of a journaled spectrum of a ``p = min(out, in)`` matrix in units of ``4**ref`` (exact powers of two; those of a
    module far below the unit underflow to 0, as its energy is nothing beside the others'), float64. Values
    at or below its :func:`noise_level` (the rounding floor of the stored weights, the Gram route's resolution) gain
    0: a budget is never spent on rounding (:func:`spectra.allocation.allocate_budget` takes no zero gain)."""
    S = np.asarray(spec["S"][:n], dtype=np.float64)
    S = np.where(noise_level(spec, p) < S, S, 0.0)
    return np.ldexp(S * S, 2 * (int(spec.get("exp", 0)) - ref))


def resolved_count(spec: dict) -> int | None:
    """How many of a journaled spectrum's singular values stand above its rounding floor (``floor``,
    :func:`spectra.delta.pair_floor`), as :func:`spectra.metrics.resolved_above` counts them: None when no floor
    is known (an adapter's exact factors, a journal without one) or every value journaled stands above it (a
    sketch may end above the floor)."""
    return resolved_above(spec.get("S") or [], float(spec.get("floor", 0.0)))


def extractable(spec: dict) -> bool:
    """Whether a journaled spectrum is an update worth factors: nonzero, and not rounding noise of the stored
    weights (the ``rounding_level`` caveat in its note: ``spectra diff`` makes no rank statement about such a
    matrix and ``recommend`` gives it none; an adapter of it would spend parameters on rounding)."""
    return float(spec["total"]) > 0 and "rounding_level" not in caveat_codes(spec.get("note") or "")


def final_ranks(targets: list[Target], plan: RankPlan, config: ExtractConfig, spectra: dict[int, dict]):
    """Each target's rank under the config's rule, from the journaled spectra; and, for a budget, its
    :class:`spectra.allocation.Allocation` with the target indices of each knapsack module (None otherwise).

    Tied groups (per-expert matrices) take one rank: under ``energy`` the largest of their members'
    ranks; under ``budget`` the group is one knapsack module whose k-th component costs the members'
    summed ``out + in`` and gains their summed σ_k².
    """
    n = len(targets)
    S = [np.asarray(spectra[i]["S"], dtype=np.float64) for i in range(n)]
    # an update at the rounding level counts as none: rank 0 (its module's note and a warning say so)
    total = [float(spectra[i]["total"]) if extractable(spectra[i]) else 0.0 for i in range(n)]
    ranks = [0] * n
    members = {i for g in plan.groups.values() for i in g}
    if config.mode == "rank":
        ranks = [plan.caps[i] if total[i] > 0 else 0 for i in range(n)]
        for g in plan.groups.values():  # an expert that did not change keeps its stack's rank (zero factors)
            if any(total[i] > 0 for i in g):
                for i in g:
                    ranks[i] = min(plan.caps[j] for j in g)
        return ranks, None
    if config.mode == "energy":
        for i in (i for i in range(n) if total[i] > 0):
            r = energy_rank_top(S[i], total[i], config.energy, targets[i].p)
            r = plan.caps[i] if r is None else r
            # directions at or below the rounding floor are the stored weights' rounding, not the update (τ = 1
            # counted float32 noise as rank): never kept, as a budget never buys them (the module's note says so)
            if (res := resolved_count(spectra[i])) is not None:
                r = min(r, res)
            ranks[i] = min(plan.caps[i], round_up(r, plan.levels[i]))
        for g in plan.groups.values():
            cap = min(plan.caps[i] for i in g)
            top = min(cap, max(ranks[i] for i in g))
            for i in g:
                ranks[i] = top if any(total[j] > 0 for j in g) else 0
        return ranks, None
    items, gains, costs, levels = [], [], [], []
    ref = common_exp(spectra[i] for i in range(n))  # one unit for every module's σ² (most: 1)
    # the ranks before the budget's cut: no rank that costs more than the budget is chosen, but the first block that
    # does not fit sets the fractional bound (cut here, every component "fitted" and the bound was the kept energy)
    allowed = _rank_levels(targets, config)
    for i in range(n):
        if i not in members:
            items.append([i])
            gains.append(energies(spectra[i], ref, allowed[i][-1] if allowed[i] else 0, targets[i].p) if total[i] > 0 else np.zeros(0))
            costs.append(targets[i].cost)
            levels.append(allowed[i])
    for g in plan.groups.values():
        cap = min(allowed[i][-1] if allowed[i] else 0 for i in g)
        summed = np.zeros(cap)
        for i in (i for i in g if total[i] > 0):
            s = energies(spectra[i], ref, cap, targets[i].p)
            summed[: s.size] += s
        items.append(g)
        gains.append(summed)
        costs.append(sum(targets[i].cost for i in g))
        levels.append([v for v in allowed[g[0]] if v <= cap])
    # each rank of the experts' one item tried (the greedy left them at r = 1 where r = 2 kept far more)
    alloc = allocate(gains, costs, plan.budget, levels=levels, tied=len(items) - 1 if plan.groups else None)
    for item, r in zip(items, alloc.ranks):
        for i in item:
            ranks[i] = r
    return ranks, (alloc, items)



def default_tie(base: Checkpoint) -> bool | None:
    """``tie_word_embeddings`` of the base's model type as transformers defaults it (GPT-2, Gemma, T5: True;
    Llama, Qwen2: False), for a config.json that leaves it out; None without a model type or transformers."""
    model_type = base.arch.model_type
    if not model_type:
        return None
    try:
        from transformers import AutoConfig

        return bool(AutoConfig.for_model(model_type).tie_word_embeddings)
    except (ImportError, ValueError, KeyError, AttributeError, TypeError):
        return None


def alias_notes(pairing: Pairing) -> list[str]:
    """One line per tied name a ``.bin`` saved whole that the pairing left out (extract's results list no such skip)."""
    return [f"{k.name} is not extracted: {k.reason.removesuffix(': measured there')}; one LoRA there holds the update of both"
            for k in pairing.skipped if k.reason.startswith(ALIAS_REASON)]


def one_lora_per_tied_weight(targets: list[Target], kept: list[Task], left: list[tuple[Any, str]], base: Checkpoint,
                              tuned: Checkpoint) -> list[str]:
    """Keep one LoRA per weight of a base that ties its output head to its embedding (it stores no head, so
    a tuned head pairs with the embedding; or its config ties them, in words or by its model type's default
    when the key is absent, as GPT-2's configs leave it out: :func:`default_tie`): an embedding
    LoRA beside a head LoRA would both be merged into the one shared tensor (PEFT's merge_and_unload: twice
    the update). The head's target is dropped (in place) when the tuned head equals the tuned embedding
    (its update is the embedding's, held once), else listed as not extracted (a tied base holds one of the
    two). Returns the warnings."""
    embedding = {t.base_name: t for t in targets if t.embedding}
    token = next((t for t in embedding.values() if t.role == "embed"), None)
    says = (base.config or {}).get("tie_word_embeddings")

    def ties(head: Target) -> bool:  # config.json's word, else its class's default (GPT-2's configs leave it out)
        if token is None or head.role != "head" or head.shape != token.shape:
            return False
        tied = says if isinstance(says, bool) else default_tie(base)
        if tied is None:  # no word, no transformers to ask: equal stored weights are taken as one tied weight
            return torch.equal(base.load(head.base_name), base.load(token.base_name))
        return tied

    by_base = {t.base_name: t for t in targets}

    def tied_to(t: Target) -> Target | None:
        # a .bin saved whole stores tied weights as one tensor under several names (T5's shared and both embed_tokens)
        root = base.tensors[t.base_name].alias_of if t.base_name in base.tensors else None
        if root is not None and root in by_base:
            return by_base[root]
        if t.embedding:
            return None
        return embedding.get(t.base_name) or (token if ties(t) else None)

    heads = [i for i, t in enumerate(targets) if tied_to(t) is not None]
    notes = []
    for i in reversed(heads):  # targets and kept are in step (one target per kept task)
        emb = tied_to(targets[i])
        head, task = targets.pop(i), kept.pop(i)
        if torch.equal(tuned.load(task.pair.tuned.name), tuned.load(emb.name)):
            notes.append(f"{head.name} is tied to {emb.base_name} in the base and equals {emb.name} in the tuned checkpoint: "
                         f"one LoRA (on {emb.module}) holds their shared update; a second on {head.module} would be "
                         "merged into the same tensor twice")
        else:
            left.append((task, f"the base ties it to {emb.base_name}: a tied base holds one matrix for both, which takes the "
                               "embedding's update (a LoRA on it, if that changed), and this head's own update differs from it"))
    return notes

def unspent_text(spent: int, budget: int, *, waiting: tuple[str, int, float, int] | None, floored: tuple[int, str],
                 of: str, capped: tuple[int, str, str] | None = None) -> str:
    """Why a budget was left partly unspent, as ``extract`` and ``recommend`` both say it: ``waiting`` = ``(module, its
    cost in parameters, the share of ``of`` its next component holds, how many modules wait so)`` when a component above
    the rounding floor costs more than what is left, else the floor's doing: ``floored`` = ``(modules stopped at it, an
    example)``; ``capped`` = ``(modules whose resolved components go on past the largest rank allowed, an example, what
    allows it)`` or None."""
    said = f"{spent:,} of the budget's {budget:,}{SPENT}"
    cap = (f"; {capped[0]} modules stop at the largest rank {capped[2]} allows (e.g. {capped[1]}) with resolved "
           "components left: raise it to give them more") if capped else ""
    if waiting is None:
        n, name = floored
        return (f"{said}: the next components of {n} modules (e.g. {name}) are at the rounding level of their stored "
                f"weights (rounding noise, not the update), which a budget is never spent on{cap}")
    name, cost, share, n = waiting
    more = f" (and those of {n - 1} other modules)" if n > 1 else ""
    return (f"{said}: the {budget - spent:,} left are less than the next resolved component of {name}, which costs "
            f"{cost:,} parameters and holds {share:.1%} of {of}{more}; raise the budget to give it rank{cap}")


def all_held_text(spent: int, budget: int, dearer: tuple[int, str] | None, capped: tuple[int, str, str] | None = None) -> str:
    """Why a budget was left unspent when no module can take another component, as ``extract`` and ``recommend`` say
    it: every module holds all of its update's directions (each at min(r, p), or every one above its rounding floor),
    or ``capped`` = ``(modules at the largest rank allowed, an example, what allows it)``; ``dearer`` = ``(modules
    whose LoRA holds more parameters than their dense ΔW, an example)`` or None."""
    said = f"{spent:,} of the budget's {budget:,}{SPENT}"
    if capped:
        n, name, cap = capped
        return (f"{said}: {n} modules are at the largest rank {cap} allows (e.g. {name}), the others hold all of their "
                "directions: the rest of the budget buys nothing under that cap")
    text = f"{said}: every module already holds all of its update's directions, so the rest of the budget buys nothing"
    return text + ("; " + dearer_text(*dearer) if dearer else "")


def dearer_text(count: int, example: str) -> str:
    """That ``count`` modules (``example`` one of them) hold a LoRA of more parameters than their dense ΔW, as
    ``extract`` and ``recommend`` say it."""
    return (f"in {count} modules (e.g. {example}) the LoRA factors hold more parameters than the dense ΔW "
            "(r·(out + in) > out·in): storing those updates whole would be smaller")


__all__ = ["EXPERTS_GROUP", "all_held_text", "common_exp", "dearer_text", "energies",
           "final_ranks", "OUT_DTYPES", "PEFT_TASK_TYPES", "RESULT_FIELDS", "ExtractConfig", "RankPlan", "Target", "is_embedding",
           "is_embedding_name", "noise_level", "resolved_count", "settle_budget",
           "default_tie", "module_of", "one_lora_per_tied_weight", "one_side_only", "plan_ranks", "stack_flip", "target_of", "unspent_text",
           "why_not_target"]
