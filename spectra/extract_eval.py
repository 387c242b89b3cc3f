"""``spectra extract --eval TEXT``: how much of the fine-tune's effect an extracted adapter keeps, as
held-out loss (mean token cross-entropy, nats per token) of the base, the tuned model, base + the
extracted adapter and base + a uniform-rank adapter of the same parameter count.

Needs the ``train`` extra (transformers, peft); models load offline (``local_files_only``) in float32.
Text is tokenised as ``spectra train`` does (the base folder's tokenizer, else UTF-8 bytes) and cut
into blocks of ``seq_len`` tokens; the first ``blocks`` blocks are scored. The loss is the mean over
every predicted token (each block's first token has no prediction), summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from spectra.errors import ConfigError
from spectra.io.adapter import is_adapter

#: Blocks scored per forward pass.
EVAL_BATCH = 8


@torch.no_grad()
def mean_token_loss(model: Any, ids: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Mean next-token cross-entropy of a causal LM over ``ids`` ``(n, seq_len)`` (labels -100 are
    not scored), in nats per token, accumulated in float64 over batches of :data:`EVAL_BATCH`."""
    model.to(device).eval()
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], EVAL_BATCH):
        x = ids[i : i + EVAL_BATCH].to(device)
        y = labels[i : i + EVAL_BATCH, 1:].to(device)
        logits = model(input_ids=x).logits[:, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                         ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
    return total / max(count, 1)


def held_out_losses(base: str, tuned: str, adapters: Mapping[str, str | Path], text: str, *, seq_len: int = 128,
                    blocks: int = 32, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Held-out losses of ``base``, ``tuned`` (a model folder or an adapter of ``base``) and ``base`` plus
    each adapter of ``adapters`` (name -> folder) on the text file ``text``.

    Returns:
        ``{"text", "seq_len", "blocks", "tokens", "loss": {"base", "tuned", <adapter names>…},
        "recovered": {name: (loss_base − loss_name) / (loss_base − loss_tuned)}}``: the share of the
        fine-tune's loss change each adapter reproduces on this text (None when the fine-tune did not
        change the loss).

    Raises:
        ConfigError: transformers or peft missing, or a model folder transformers cannot load offline.
    """
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConfigError("--eval needs transformers and peft", hint="pip install 'spectra[train]'") from None
    from spectra.training import check_vocabulary, load_tokenizer, read_examples, token_blocks

    device = torch.device(device)
    for folder in (base, tuned):
        if not (Path(folder) / "config.json").is_file() and not is_adapter(folder):
            raise ConfigError("--eval loads the models with transformers: this is not a model folder with config.json",
                              path=folder, hint="pass model folders as BASE and TUNED, or drop --eval")
    tok = load_tokenizer(base)
    ids, labels = token_blocks(read_examples(text), tok, seq_len)
    check_vocabulary(base, tok, ids)
    ids, labels = ids[:blocks], labels[:blocks]

    def load_base():
        return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, local_files_only=True)

    losses: dict[str, float] = {"base": mean_token_loss(load_base(), ids, labels, device)}
    if is_adapter(tuned):
        model = PeftModel.from_pretrained(load_base(), str(tuned))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(tuned), dtype=torch.float32, local_files_only=True)
    losses["tuned"] = mean_token_loss(model, ids, labels, device)
    del model
    for name, folder in adapters.items():
        losses[name] = mean_token_loss(PeftModel.from_pretrained(load_base(), str(folder)), ids, labels, device)
    change = losses["base"] - losses["tuned"]
    recovered = {n: ((losses["base"] - v) / change if change != 0 and math.isfinite(change) else None) for n, v in losses.items()
                 if n not in ("base", "tuned")}
    return {"text": str(text), "seq_len": seq_len, "blocks": int(ids.shape[0]), "tokens": int((labels[:, 1:] != -100).sum()),
            "loss": losses, "recovered": recovered}


__all__ = ["EVAL_BATCH", "held_out_losses", "mean_token_loss"]
