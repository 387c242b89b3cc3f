"""What changed between PEFT releases in how an adapter on disk is loaded and merged: the version a file was saved
by (``adapter_config.json``'s ``peft_version``) or the installed one decides some numbers. Each rule was read from
PEFT's source and checked against its own loading (``tests/test_peft_releases.py``).
"""

from __future__ import annotations

import re

#: The first PEFT release that keeps an all-``nn.Linear`` target beside the fused MoE experts it converts (its #3711).
KEEPS_LINEAR_TARGETS = (0, 22)
#: The first PEFT release that saves rank_pattern / alpha_pattern in their own order (earlier ones sorted the keys).
KEEPS_PATTERN_ORDER = (0, 22)
#: Model types whose per-expert LoRAs PEFT converts to its LoRA on the fused experts from this release on (earlier ones
#: drop them on load).
CONVERTED_SINCE: dict[str, tuple[int, ...]] = {"qwen2_moe": (0, 22)}


def release(version: str) -> tuple[int, ...]:
    """A version string's leading release numbers: ``"0.22.0.dev0@abc"`` -> ``(0, 22, 0)``; ``()`` when it has none.

    >>> release("0.21.2") < (0, 22) <= release("0.22.0.dev0")
    True
    """
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(x) for x in match.group().split(".")) if match else ()


#: Why an ``nn.MultiheadAttention``'s ``out_proj`` update is 2·s·B·A in an adapter saved before PEFT 0.22 (PEFT #3774).
MHA_TWICE = ("PEFT before 0.22 applied the out_proj LoRA of an nn.MultiheadAttention twice, and PEFT 0.22 doubles lora_B "
             "of files saved so on load: the update is 2·s·B·A")


def mha_out_proj_twice(peft_version: str | None) -> bool:
    """Whether PEFT applies the ``out_proj`` LoRA of an ``nn.MultiheadAttention`` saved under ``peft_version`` twice:
    releases before 0.22 added it twice (PEFT #3774), and 0.22 doubles ``lora_B`` of such files on load to keep their
    outputs: a config without ``peft_version`` (before 0.18), a release before 0.21.1, or a non-dev one before 0.22.

    >>> [mha_out_proj_twice(v) for v in (None, "0.21.2", "0.21.1.dev0", "0.22.0")]
    [True, True, False, False]
    """
    if not peft_version:
        return True
    number = release(peft_version.partition("@")[0])
    return number < (0, 21, 1) or ("dev" not in peft_version and number < (0, 22))


__all__ = ["CONVERTED_SINCE", "KEEPS_LINEAR_TARGETS", "KEEPS_PATTERN_ORDER", "MHA_TWICE", "mha_out_proj_twice", "release"]
