"""Trimem against the float PyTorch model: accuracy per layer, token agreement, perplexity and
speed, written as a Markdown + JSON report with plots.

The float model (Hugging Face `transformers`, on the GPU when there is one) and a Trimem
session (the quantized model on a backend) see the same token sequences:

- per-layer hidden states (the residual stream after each decoder layer) of the float model
  and of the integer reference, as cosine similarity and largest absolute error; the first
  layer whose cosine drops below `DIVERGE_COSINE` is where the two part ways;
- top-1 agreement, teacher-forced: each prompt followed by the float model's greedy
  continuation is fed to both, and the argmax of every position is compared;
- perplexity of both on a text;
- speed: the float model's measured time to first token and decode tokens/s on its device,
  against the simulated tokens/s, time per token and energy per token of the hardware.

The hidden states come from the integer reference, which every backend matches bit for bit;
with another backend its logits are checked against the reference's and the report says so.
"""
from __future__ import annotations

import copy
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from trimem.compiler.quantize import SMOOTH_ALPHA
from trimem.host.session import Session, load_source, load_tokenizer
from trimem.numerics import from_fx

DIVERGE_COSINE = 0.99
"""A layer whose hidden-state cosine with the float model falls below this has diverged."""
PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "Once upon a time, in a small village by the sea,",
    "To make a good cup of tea, you first",
    "The main difference between a virus and a bacterium is that",
    "def fibonacci(n):",
    "The three primary colors are",
)
"""The fixed prompts of the agreement measurements."""
TEXT = (
    "A library is more than a room full of books. It is a place where people come to read, "
    "to study and to meet. Children learn to love stories there, students prepare for their "
    "exams, and older readers find newspapers from all over the world. Most libraries today "
    "also lend music, films and electronic books, and many offer free access to computers "
    "and the internet. Librarians help visitors find what they need, organise events and "
    "keep the collection up to date. In many towns the public library is one of the few "
    "places that are open to everyone, free of charge, and quiet enough to think."
)
"""The text both models' perplexity is measured on."""
DTYPES = ("float32", "float16", "bfloat16")


# ---- the float model -----------------------------------------------------------------------

def float_model(model, device: str, dtype: str):
    """A copy of the float model on `device` in `dtype` (the cached original stays on CPU)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use "
                         "--device cpu or run on a machine with an NVIDIA GPU")
    return copy.deepcopy(model).to(device=device, dtype=getattr(torch, dtype)).eval()


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's, as benchmarks report it."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def float_pass(model, ids) -> tuple:
    """(logits float64 [T, vocab], hidden per layer float64 [T, hidden]) of one sequence."""
    import torch

    hidden = []

    def keep(module, args, output):
        hidden.append((output[0] if isinstance(output, tuple) else output)[0])

    layers = model.get_submodule("model.layers")
    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(torch.as_tensor([ids], device=device)).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    as_np = [t.double().cpu().numpy() for t in [logits, *hidden]]
    return as_np[0], as_np[1:]


def float_greedy(model, ids, new_tokens: int) -> list:
    """The float model's greedy continuation of `ids`, `new_tokens` tokens."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(torch.as_tensor([ids], device=device), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_float(model, ids, new_tokens: int, repeats: int = 3) -> dict:
    """Measured time to first token and decode tokens/s of the float model, batch 1, greedy
    with its KV cache (`generate`); the best of `repeats` runs after one warm-up. Decode time
    is a run of 1 + new_tokens tokens minus a run of 1."""
    import torch

    device = str(next(model.parameters()).device)
    prompt = torch.as_tensor([ids], device=device)

    def timed(tokens):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False)
        _sync(device)
        return time.perf_counter() - start

    timed(1 + new_tokens)
    first = min(timed(1) for _ in range(repeats))
    decode = max(min(timed(1 + new_tokens) for _ in range(repeats)) - first, 1e-9)
    return {"ttft_s": first, "tpot_s": decode / new_tokens, "tokens_per_s": new_tokens / decode,
            "new_tokens": new_tokens, "repeats": repeats}


# ---- the comparison ------------------------------------------------------------------------

def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened."""
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), math.ulp(1.0)))


def nll(logits, ids) -> np.ndarray:
    """Negative log-likelihood of ids[1:] under float logits [T, vocab] (positions 0..T-2)."""
    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]]


def _numpy(x) -> np.ndarray:
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


class _Trimem:
    """The quantized side: the integer reference for hidden states, the session's backend for
    logits (checked against the reference), the session for generation."""

    def __init__(self, session: Session, device: str):
        from trimem.compiler.reference import Reference

        self.session = session
        reference = getattr(session.backend, "reference", None)
        self.reference = reference or Reference(session.graph, device=device)
        self.matches = None if reference is not None else True

    def run(self, ids) -> tuple:
        """(fx logits [T, vocab], hidden per layer float64) of one sequence from position 0."""
        self.reference.reset(0)
        step = self.reference.step(ids, np.arange(len(ids)), seq=0)
        logits = _numpy(step.logits)
        if self.matches is not None:
            (seq_id, theirs), = self.session.prefill(ids).logits.items()
            self.session.remove(self.session.sequences[seq_id])
            self.matches = self.matches and bool(np.array_equal(theirs, logits))
            logits = theirs
        self.reference.reset(0)
        return logits, [from_fx(_numpy(h)) for h in step.hidden]


def _layers(float_hidden, trimem_hidden) -> list:
    out = []
    for i, (f, q) in enumerate(zip(float_hidden, trimem_hidden)):
        f, q = np.concatenate(f), np.concatenate(q)
        err = np.abs(f - q)
        out.append({"layer": i, "cosine": cosine(f, q), "max_abs_err": float(err.max()),
                    "rel_err": float(np.linalg.norm(f - q) / max(np.linalg.norm(f),
                                                                 math.ulp(1.0)))})
    return out


def compare(model, hw="trimem-all", quant="w4a8kv4", sparsity=None, sparse_layers="mlp", *,
            smooth_alpha=SMOOTH_ALPHA, backend="torch", device=None, dtype="float32",
            prompts=PROMPTS, text=TEXT, new_tokens=16, free_running=2, buckets=None,
            session=None, tokenizer=None, out=None, progress=False) -> dict:
    """Compare the float model with Trimem; return the report (plain data) and, with `out`,
    write report.md, report.json and the plots there.

    model : as `Session` takes it (a model object, "smollm2-135m", a directory, a GGUF).
    device : where the float model (and the torch backend) run; default CUDA when present.
    smooth_alpha : the SmoothQuant strength of the compile (`quantize.smooth`); None for none.
    dtype : the float model's dtype, "float32", "float16" or "bfloat16".
    free_running : how many of the prompts (the first) Trimem also generates from on its
        own, for the texts, the matching greedy tokens and the simulated speed.
    session : an existing Session to reuse instead of compiling (its settings win).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = load_source(model)
    if source is None:
        raise ValueError(f"model {model!r} is a config without weights; compare needs a "
                         "model with weights (a directory, a .gguf file or 'smollm2-135m')")
    tok = tokenizer or load_tokenizer(model)
    if tok is None:
        raise ValueError(f"no tokenizer found for model {model!r}; pass tokenizer=...")
    fmodel = float_model(source, device, dtype)
    if session is None:
        session = Session(model, hw, quant, sparsity, sparse_layers, backend=backend,
                          buckets=buckets, device=device, tokenizer=tok, progress=progress,
                          compile_options={"smooth_alpha": smooth_alpha})
    trimem = _Trimem(session, device)
    bar = _bar(len(prompts) + 1, progress)
    float_hidden, trimem_hidden, per_prompt = None, None, []
    agree = total = 0
    for prompt in prompts:
        ids = list(tok(prompt)["input_ids"])
        cont = float_greedy(fmodel, ids, new_tokens)
        seq = ids + cont
        flog, fhid = float_pass(fmodel, seq)
        qlog, qhid = trimem.run(seq)
        float_hidden = [[h] for h in fhid] if float_hidden is None else \
            [acc + [h] for acc, h in zip(float_hidden, fhid)]
        trimem_hidden = [[h] for h in qhid] if trimem_hidden is None else \
            [acc + [h] for acc, h in zip(trimem_hidden, qhid)]
        same = flog.argmax(-1) == qlog.argmax(-1)
        agree, total = agree + int(same.sum()), total + len(seq)
        entry = {"prompt": prompt, "tokens": len(seq), "top1_agreement": float(same.mean()),
                 "logits_cosine": cosine(flog, from_fx(qlog)),
                 "float_text": tok.decode(cont, skip_special_tokens=True)}
        if len(per_prompt) < free_running:
            gen = session.generate(ids, new_tokens, stop=())
            entry.update({"trimem_text": tok.decode(gen.ids, skip_special_tokens=True),
                          "matching_prefix": next((i for i, (a, b) in enumerate(
                              zip(cont, gen.ids)) if a != b), len(cont)),
                          "metrics": gen.metrics.to_dict()})
        per_prompt.append(entry)
        bar.update()
    text_ids = list(tok(text)["input_ids"])
    flog, _ = float_pass(fmodel, text_ids)
    qlog, _ = trimem.run(text_ids)
    bar.update()
    bar.close()
    layers = _layers(float_hidden, trimem_hidden)
    report = {
        "model": session.bundle.model["name"], "hw": session.config.name,
        "quant": session.bundle.quant["spec"], "sparsity": session.bundle.quant["sparsity"],
        "sparse_layers": session.bundle.quant["sparse_blocks"],
        "smooth_alpha": session.bundle.quant.get("smooth_alpha"),
        "backend": session.backend.name,
        "backend_matches_reference": trimem.matches,
        "float": {"device": device, "device_name": device_name(device), "dtype": dtype,
                  "torch": torch.__version__},
        "prompts": len(prompts), "new_tokens": new_tokens,
        "top1_agreement": agree / total, "top1_positions": total,
        "layers": layers, "diverge_cosine": DIVERGE_COSINE,
        "first_diverging_layer": next((l["layer"] for l in layers
                                       if l["cosine"] < DIVERGE_COSINE), None),
        "largest_drop_layer": _largest_drop(layers),
        "perplexity": {"float": float(np.exp(nll(flog, text_ids).mean())),
                       "trimem": float(np.exp(nll(from_fx(qlog), text_ids).mean())),
                       "tokens": len(text_ids)},
        "per_prompt": per_prompt,
        "speed": {"float": {"device_name": device_name(device), "dtype": dtype,
                            **measure_float(fmodel, list(tok(prompts[0])["input_ids"]),
                                            new_tokens)},
                  "trimem": _speed(per_prompt, session)},
    }
    if out is not None:
        write_report(report, out)
    return report


def _largest_drop(layers) -> int | None:
    cos = [1.0] + [l["cosine"] for l in layers]
    drops = [cos[i] - cos[i + 1] for i in range(len(layers))]
    return int(np.argmax(drops)) if drops else None


def _speed(per_prompt, session) -> dict:
    """The simulated hardware's speed over the free-running generations."""
    runs = [p["metrics"] for p in per_prompt if "metrics" in p]
    timed = [r for r in runs if r["tokens_per_s"] is not None]
    out = {"hw": session.config.name, "backend": session.backend.name,
           "wall_s": sum(r["wall_s"] for r in runs)}
    if timed:
        busy: dict = {}
        for r in timed:
            for name, value in r["busy_s"].items():
                busy[name] = busy.get(name, 0.0) + value
        sim = sum(r["sim_s"] for r in timed)
        out.update({key: float(np.mean([r[key] for r in timed]))
                    for key in ("ttft_s", "tpot_s", "tokens_per_s", "energy_per_token_j")
                    if all(r[key] is not None for r in timed)})
        out["busy_s"] = busy
        out["utilization"] = {k: v / sim for k, v in busy.items()}
    return out


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="compare", unit="prompt", disable=not enabled, leave=False)


# ---- the report ----------------------------------------------------------------------------

def _fmt(value, spec=".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """The report as Markdown."""
    f, s = report["speed"]["float"], report["speed"]["trimem"]
    ppl = report["perplexity"]
    lines = [
        f"# Trimem vs PyTorch: {report['model']}",
        "",
        f"Trimem: `{report['hw']}`, {report['quant']}, sparsity {report['sparsity'] or 'dense'}"
        f" ({report['sparse_layers']}), SmoothQuant alpha {report['smooth_alpha']}, backend "
        f"`{report['backend']}`"
        + ("" if report["backend_matches_reference"] is None else
           f" (logits {'equal' if report['backend_matches_reference'] else 'DIFFER from'} "
           "the integer reference)") + ".",
        f"PyTorch: {report['float']['dtype']} on {report['float']['device_name']}, torch "
        f"{report['float']['torch']}.",
        "",
        "| measure | PyTorch float | Trimem |",
        "|---|---|---|",
        f"| top-1 agreement, teacher-forced ({report['top1_positions']} positions, "
        f"{report['prompts']} prompts) | reference | {report['top1_agreement']:.2%} |",
        f"| perplexity ({ppl['tokens']} tokens) | {ppl['float']:.3f} | {ppl['trimem']:.3f} |",
        f"| time to first token | {f['ttft_s'] * 1e3:.3f} ms (measured) | "
        f"{_fmt(_scale(s.get('ttft_s'), 1e3))} ms (simulated) |",
        f"| time per output token | {f['tpot_s'] * 1e3:.3f} ms (measured) | "
        f"{_fmt(_scale(s.get('tpot_s'), 1e3))} ms (simulated) |",
        f"| decode tokens/s | {f['tokens_per_s']:.1f} (measured) | "
        f"{_fmt(s.get('tokens_per_s'), '.1f')} (simulated) |",
        f"| energy per token | - | {_fmt(_scale(s.get('energy_per_token_j'), 1e3))} mJ "
        "(simulated) |",
        "",
        f"First layer with hidden-state cosine below {report['diverge_cosine']}: "
        f"{report['first_diverging_layer']}; largest single-layer drop: layer "
        f"{report['largest_drop_layer']}.",
        "",
        "| layer | cosine | max abs error | relative error |",
        "|---|---|---|---|",
    ]
    lines += [f"| {l['layer']} | {l['cosine']:.5f} | {l['max_abs_err']:.4g} | "
              f"{l['rel_err']:.4g} |" for l in report["layers"]]
    lines += ["", "| prompt | agreement | same greedy tokens | PyTorch | Trimem |",
              "|---|---|---|---|---|"]
    for p in report["per_prompt"]:
        same = f"{p['matching_prefix']}/{report['new_tokens']}" if "metrics" in p else "-"
        lines.append(f"| {_cell(p['prompt'])} | {p['top1_agreement']:.0%} | {same} | "
                     f"{_cell(p['float_text'])} | {_cell(p.get('trimem_text', '-'))} |")
    if s.get("busy_s"):
        lines += ["", "| engine | busy (simulated) | utilization |", "|---|---|---|"]
        lines += [f"| {k} | {v * 1e3:.4g} ms | {s['utilization'][k]:.1%} |"
                  for k, v in s["busy_s"].items()]
    lines += ["", "Plots: layers.png (per-layer agreement), speed.png, engines.png.", ""]
    return "\n".join(lines)


def _scale(value, factor):
    return None if value is None else value * factor


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def plots(report: dict, out: Path) -> list:
    """layers.png, speed.png and engines.png of the report; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([l["layer"] for l in layers], [l["cosine"] for l in layers], "o-", label="cosine")
    ax.axhline(report["diverge_cosine"], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("hidden-state cosine")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    twin = ax.twinx()
    twin.plot([l["layer"] for l in layers], [l["rel_err"] for l in layers], "s-", color="C1",
              label="relative error")
    twin.set_ylabel("relative error")
    handles = ax.get_lines()[:1] + twin.get_lines()
    ax.legend(handles, [h.get_label() for h in handles], loc="center left")
    ax.set_title(f"{report['model']}: {report['quant']} vs float")
    fig.tight_layout()
    written.append(out / "layers.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    f, s = report["speed"]["float"], report["speed"]["trimem"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [f"PyTorch {f['dtype']}\n{f['device_name'][:24]} (measured)"]
    values = [f["tokens_per_s"]]
    if s.get("tokens_per_s"):
        labels.append(f"Trimem {report['hw']}\n(simulated)")
        values.append(s["tokens_per_s"])
    bars = ax.bar(labels, values, color=["C0", "C2"][:len(values)])
    ax.bar_label(bars, fmt="%.4g")
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s, batch 1 (log scale)")
    fig.tight_layout()
    written.append(out / "speed.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if s.get("busy_s"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar(list(s["busy_s"]), [v * 1e3 for v in s["busy_s"].values()])
        ax.set_ylabel("busy time, simulated (ms)")
        ax.set_title("where the time went")
        fig.tight_layout()
        written.append(out / "engines.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(report: dict, out) -> Path:
    """Write report.json, report.md and the plots into directory `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plots(report, out)
    return out


def export_hf(model, out, tokenizer=None) -> Path:
    """Save the float model as safetensors with its config and tokenizer in directory `out`,
    so it loads with plain `transformers` (no GGUF reader) on another machine."""
    source = load_source(model)
    if source is None:
        raise ValueError(f"model {model!r} is a config without weights; nothing to export")
    tok = tokenizer or load_tokenizer(model)
    if tok is None:
        raise ValueError(f"no tokenizer found for model {model!r}; pass tokenizer=...")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
