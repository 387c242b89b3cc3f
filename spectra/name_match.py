"""Which tensor of one checkpoint is which of another, by name alone (shapes and layouts are pairing's business,
:mod:`spectra.pairing`): the one rule for the pairing of matrices and for comparing the tensors it does not analyse
(:func:`spectra.stored_bytes.base_lookup`)."""

from __future__ import annotations

from collections import Counter

from spectra.io.checkpoint import TensorInfo
from spectra.naming import ENCODER_PREFIXES, pairing_key, unique_pairing_keys


def match_names(base_tensors: dict[str, TensorInfo], tuned_tensors: dict[str, TensorInfo]) -> list[tuple[str, str]]:
    """``(base name, tuned name)`` of the tensors the two checkpoints hold under one name: exact name matches first,
    then unique pairing-key matches (another wrapper prefix), then an encoder's prefix dropped on one side alone."""
    base_names, tuned_names = list(base_tensors), list(tuned_tensors)
    matches: list[tuple[str, str]] = []
    tuned_set = set(tuned_names)
    used_t: set[str] = set()
    rest_b: list[str] = []
    for n in base_names:
        if n in tuned_set:
            matches.append((n, n))
            used_t.add(n)
        else:
            rest_b.append(n)
    rest_t = [n for n in tuned_names if n not in used_t]

    bk, tk = unique_pairing_keys(rest_b), unique_pairing_keys(rest_t)
    for key, bn in bk.items():
        if key in tk:
            matches.append((bn, tk[key]))
    # last: an encoder's prefix (distilbert., vit. …) on one side against the headless model on the other, where
    # dropping it is unambiguous; never on both sides, in one name or across names (hubert. against wav2vec2., or
    # vit. dropped from a base name and deit. from a tuned one, are two models)
    done_b, done_t = {b for b, _ in matches}, {t for _, t in matches}
    rest_b, rest_t = [n for n in rest_b if n not in done_b], [n for n in rest_t if n not in done_t]
    plain_b, plain_t = unique_pairing_keys(rest_b), unique_pairing_keys(rest_t)
    bare_b, bare_t = _encoder_keys(rest_b, base_tensors), _encoder_keys(rest_t, tuned_tensors)
    from_base = [(n, plain_t[k]) for k, n in bare_b.items() if k in plain_t]
    from_tuned = [(plain_b[k], n) for k, n in bare_t.items() if k in plain_b]
    if not (from_base and from_tuned):
        matches += from_base or from_tuned
    return matches


def _encoder_keys(names: list[str], every: dict[str, TensorInfo]) -> dict[str, str]:
    """Unique key -> name of the ``names`` that begin with an :data:`~spectra.naming.ENCODER_PREFIXES` component,
    keyed without it, where no other tensor of the checkpoint (``every``) has, or would have, that key; and none at
    all under a prefix one of whose matrices would (a dual encoder's ``vit.encoder…`` beside ``text_model.encoder…``
    keeps its prefix on every name: its text tower would pair with the vision one; AST's ``layernorm.weight`` beside
    its classifier's is one 1-D name, not a tower)."""
    keys = [pairing_key(n) for n in every]
    own = set(keys)
    tails = Counter(pairing_key(k.partition(".")[2]) for k in keys if "." in k)  # each name without its first component

    def bare(key: str) -> str | None:
        head, _, tail = key.partition(".")
        return pairing_key(tail) if head in ENCODER_PREFIXES and tail else None

    def collides(b: str) -> bool:
        return b in own or tails[b] > 1

    # a prefix any of whose matrices would collide is one tower of several: kept on all its names, not only those
    towers = {k.partition(".")[0] for k, info in zip(keys, every.values())
              if len(info.shape) >= 2 and (b := bare(k)) is not None and collides(b)}
    found: dict[str, list[str]] = {}
    for n in names:
        key = pairing_key(n)
        if (b := bare(key)) is not None and not collides(b) and key.partition(".")[0] not in towers:
            found.setdefault(b, []).append(n)
    return {k: v[0] for k, v in found.items() if len(v) == 1}


__all__ = ["match_names"]
