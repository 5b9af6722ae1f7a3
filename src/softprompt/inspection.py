"""Looking inside saved prompts: what each virtual token is near in the vocabulary, how large it is
against real tokens, how far training moved it from its init, and how similar prompts of different
tasks are (prompts as task embeddings, as in Vu et al.'s SPoT).

Named ``inspect_prompt`` so it does not shadow the standard library's ``inspect``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.nn import functional as F

from softprompt.config import InitMethod, PromptConfig
from softprompt.deep import DeepPrompt
from softprompt.embedding import token_vectors, vocabulary_chunks, vocabulary_mean_std, vocabulary_size
from softprompt.errors import SoftpromptError, UsageError
from softprompt.learned import ClassHead
from softprompt.loading import load_model
from softprompt.prompt import SoftPrompt, load_prompt

log = logging.getLogger(__name__)


def reconstruct_init(prompt: SoftPrompt, model, tokenizer) -> tuple[torch.Tensor | None, str]:
    """The prompt's values before training, rebuilt from its metadata, and a note saying how.

    ``text`` needs only the init text; ``labels``/``vocab``/``random`` need the seed, which
    ``softprompt train`` and ``softprompt init`` record as ``init_seed``; ``file`` needs the
    source prompt to still exist. Returns (None, reason) when the init cannot be rebuilt.
    """
    meta, P = prompt.meta, prompt.num_virtual_tokens
    try:
        method = InitMethod(meta.init)
    except ValueError:
        return None, f"init {meta.init!r} is unknown to this version"
    if method == InitMethod.FILE:
        source = meta.init_file
        if not source or not Path(source).is_dir():
            return None, "init=file and the source prompt is not recorded or no longer exists"
        kwargs = {"init_file": source}
    elif method == InitMethod.TEXT:
        if not meta.init_text:
            return None, "init=text but the init text is not recorded"
        kwargs = {"init_text": meta.init_text}
    elif meta.init_seed is None:
        return None, (
            f"init={method.value} is random and the seed is not recorded (saved by PEFT or an older "
            "softprompt); retrain to record it"
        )
    elif method == InitMethod.LABELS and not meta.label_words:
        return None, "init=labels but the label words are not recorded"
    else:
        kwargs = {"label_words": meta.label_words}
    try:
        cfg = PromptConfig(
            num_virtual_tokens=P,
            init=method,
            seed=meta.init_seed or 0,
            vocab_top_k=meta.vocab_top_k or PromptConfig.vocab_top_k,
            **kwargs,
        )
        weight = SoftPrompt.initialize(cfg, model, tokenizer).weight.detach()
    except (SoftpromptError, ValueError, OSError) as e:
        return None, f"could not rebuild the init ({e})"
    how = f"rebuilt from init={method.value}" + (
        f" seed {cfg.seed}" if method not in (InitMethod.TEXT, InitMethod.FILE) else ""
    )
    return weight, how


def token_text(tokenizer, token_id: int) -> str:
    """A readable token: decoded (so 'Ġgood' shows as ' good'), falling back to the raw piece."""
    text = tokenizer.decode([token_id])
    return text if text.strip() else tokenizer.convert_ids_to_tokens(token_id)


def nearest_tokens(
    weight: torch.Tensor, model, limit: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine top-k of each prompt vector among the decoder-input vectors of ids ``0..limit-1``, and
    those vectors' norms: ``(values (P, k), ids (P, k), norms (limit,))``, a vocabulary chunk at a time."""
    unit = F.normalize(weight, dim=1)  # (P, D)
    best_values = best_ids = None
    norms = []
    for start, vectors in vocabulary_chunks(model, limit):  # (n, D) each
        norms.append(vectors.norm(dim=1))
        cos = unit @ F.normalize(vectors, dim=1).T  # (P, n)
        values, ids = cos.topk(min(top_k, cos.shape[1]), dim=1)
        if best_values is not None:
            values, ids = torch.cat([best_values, values], 1), torch.cat([best_ids, ids + start], 1)
            values, pick = values.topk(min(top_k, values.shape[1]), dim=1)
            ids = torch.gather(ids, 1, pick)
        best_values, best_ids = values, ids
    return best_values, best_ids, torch.cat(norms)


def inspect_prompt(prompt: SoftPrompt, model, tokenizer, top_k: int = 5, path: str = "") -> dict:
    """Per-virtual-token figures for one prompt (see the module docstring). Pure: nothing is printed.

    Tokens are compared as the decoder receives them (:mod:`softprompt.embedding`): on Gemma the
    embedding matrix's rows are sqrt(hidden_size) times shorter than that, and norms against them
    would put every token of a working prompt above the whole vocabulary.
    """
    weight = prompt.weight.detach().float().cpu()  # (P, D)
    hidden = model.get_input_embeddings().weight.shape[1]
    if weight.shape[1] != hidden:
        raise UsageError(
            f"prompt {path or ''} has {weight.shape[1]}-dimensional vectors but the model's embeddings have "
            f"{hidden}; inspect it with the base model it was trained on (--model)"
        )
    # Rows past the tokenizer (padding rows some models add) decode to nothing: leave them out.
    V = min(vocabulary_size(model), len(tokenizer))
    top_values, top_ids, vocab_norms = nearest_tokens(weight, model, V, top_k)
    sorted_norms = vocab_norms.sort().values
    init, init_note = reconstruct_init(prompt, model, tokenizer)
    tokens = []
    for i in range(weight.shape[0]):
        norm = float(weight[i].norm())
        row = {
            "index": i,
            "norm": norm,
            # Share of vocabulary vectors shorter than this one: 1.0 = longer than every real token.
            "norm_percentile": float(torch.searchsorted(sorted_norms, torch.tensor(norm)) / V),
            "nearest": [
                {"token": token_text(tokenizer, int(t)), "id": int(t), "cosine": float(c)}
                for c, t in zip(top_values[i], top_ids[i], strict=True)
            ],
        }
        if init is not None:
            start = init[i].float()
            row["distance_from_init"] = float((weight[i] - start).norm())
            row["relative_distance_from_init"] = row["distance_from_init"] / max(float(start.norm()), 1e-12)
            row["cosine_to_init"] = float(F.cosine_similarity(weight[i], start, dim=0))
        tokens.append(row)
    return {
        "path": path,
        "num_virtual_tokens": weight.shape[0],
        "token_dim": weight.shape[1],
        "init": prompt.meta.init,
        "init_reconstructed": init is not None,
        "init_note": init_note,
        "vocab_norm_min": float(sorted_norms[0]),
        "vocab_norm_median": float(sorted_norms[V // 2]),
        "vocab_norm_max": float(sorted_norms[-1]),
        "norm_mean": float(weight.norm(dim=1).mean()),
        "mean_distance_from_init": (
            sum(t["distance_from_init"] for t in tokens) / len(tokens) if init is not None else None
        ),
        "tokens": tokens,
    }


def inspect_classes(prompt, model, tokenizer, top_k: int = 5) -> list[dict] | None:
    """A learned verbalizer's class vectors: per class its label and words, norm, cosine to its start
    (the mean of its words' LM-head vectors) and nearest tokens in the LM head's space, where the
    vectors live. None for a prompt without class vectors."""
    classes = getattr(prompt, "classes", None)
    if classes is None:
        return None
    head = model.get_output_embeddings().weight.detach().float().cpu()  # (V, D)
    V = min(head.shape[0], len(tokenizer))
    vectors = classes.vectors.detach().float().cpu()
    cos = F.normalize(vectors, dim=1) @ F.normalize(head[:V], dim=1).T  # (C, V)
    values, ids = cos.topk(min(top_k, V), dim=1)
    words = prompt.meta.verbalizer or {str(i): w for i, w in enumerate(prompt.meta.label_words or [])}
    rows = []
    named = list(words.items())[: classes.num_classes]
    word_ids = tuple(tuple(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) for _, word in named)
    starts = ClassHead.from_label_ids(model, word_ids).vectors.detach().cpu()  # where training started them
    for c, ((label, word), start) in enumerate(zip(named, starts, strict=True)):
        rows.append({
            "label": label, "word": word, "norm": float(vectors[c].norm()), "bias": float(classes.bias[c]),
            "cosine_to_start": float(F.cosine_similarity(vectors[c], start, dim=0)),
            "nearest": [{"token": token_text(tokenizer, int(t)), "id": int(t), "cosine": float(v)}
                        for v, t in zip(values[c], ids[c], strict=True)],
        })  # fmt: skip
    return rows


def format_classes(rows: list[dict]) -> list[str]:
    lines = ["  learned verbalizer (class vectors in the LM head's space; cos0: cosine to the words' start):",
             "  label / word                      norm   bias   cos0  nearest tokens (cosine)"]  # fmt: skip
    for r in rows:
        name = f"{r['label']} / {r['word']}"
        near = ", ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in r["nearest"])
        lines.append(
            f"  {name[:32]:<32}  {r['norm']:5.2f}  {r['bias']:5.2f}  {r['cosine_to_start']:5.2f}  {near}"
        )
    return lines


def prompt_similarity(prompts: list[SoftPrompt], model) -> dict:
    """Cosine similarity of prompts as task embeddings: each prompt mean-pooled over its tokens
    (prompts of different lengths compare), raw and centred on the vocabulary's mean vector (as the
    decoder receives tokens).

    Token embeddings share a common direction, so raw cosines of any two prompts tend to be high;
    the centred cosine removes it and separates tasks better. Returns (N, N) lists.
    """
    emb_mean, _ = vocabulary_mean_std(model)  # (D,)
    pooled = torch.stack([p.weight.detach().float().cpu().mean(dim=0) for p in prompts])  # (N, D)
    raw = F.normalize(pooled, dim=1)
    centred = F.normalize(pooled - emb_mean, dim=1)
    return {"cosine_raw": (raw @ raw.T).tolist(), "cosine_centred": (centred @ centred.T).tolist()}


def inspect_paths(
    paths: list[str], model_name: str | None = None, top_k: int = 5, dtype: str = "float32"
) -> dict:
    """Load the prompts in ``paths`` and their base model (``model_name``, else the first prompt's
    recorded base model) and inspect them all."""
    if not paths:
        raise UsageError("no prompts given; pass one or more saved prompt folders")
    if top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    loaded = [load_prompt(p) for p in paths]  # fail on a bad folder before waiting for the model
    name = model_name or loaded[0].meta.base_model or "smollm2"
    model, tokenizer = load_model(name, dtype=dtype, device="cpu")
    prompts = [load_prompt(p, model) for p in paths]  # now with the base-model check
    result = {
        "base_model": name,
        "prompts": [
            inspect_deep(p, model, tokenizer, path) if isinstance(p, DeepPrompt)
            else inspect_prompt(p, model, tokenizer, top_k, path)
            for p, path in zip(prompts, paths, strict=True)
        ],
    }  # fmt: skip
    for p, r in zip(prompts, result["prompts"], strict=True):
        r["classes"] = inspect_classes(p, model, tokenizer, top_k)
    inputs = [(p, path) for p, path in zip(prompts, paths, strict=True) if not isinstance(p, DeepPrompt)]
    if len(inputs) > 1:  # deep prompts are keys and values, not vectors in the token space
        result["similarity"] = {
            "paths": [q for _, q in inputs],
            **prompt_similarity([p for p, _ in inputs], model),
        }
    return result


DEEP_NOTE = (
    "a deep prompt holds keys and values at every layer, not vectors in the token space: nearest tokens, "
    "vocabulary norms and similarity to other prompts are not defined for it. Shown: each layer's key and "
    "value norms against those the model makes of real text (ratio 1 = the scale of real tokens)."
)


def inspect_deep(prompt: DeepPrompt, model, tokenizer, path: str = "", sample_tokens: int = 64) -> dict:
    """Per-layer figures of a deep prompt: mean key and value norms of its virtual tokens beside the
    median of those the model makes of ``sample_tokens`` common tokens run as a text."""
    from softprompt.model import PromptedLM

    ids = list(range(min(sample_tokens, len(tokenizer), vocabulary_size(model))))
    reference = PromptedLM(model).prefix_cache(token_vectors(model, torch.tensor(ids)))
    layers = []
    for i, ((k, v), (rk, rv)) in enumerate(
        zip(prompt.as_prefix(torch.float32, "cpu").layers, reference.layers, strict=True)
    ):
        norms = {
            name: t.detach().float().norm(dim=-1)
            for name, t in (("key", k), ("value", v), ("ref_key", rk), ("ref_value", rv))
        }
        key, value = float(norms["key"].mean()), float(norms["value"].mean())
        ref_key, ref_value = float(norms["ref_key"].median()), float(norms["ref_value"].median())
        layers.append({"layer": i, "key_norm": key, "value_norm": value, "real_key_norm": ref_key,
                       "real_value_norm": ref_value, "key_ratio": key / max(ref_key, 1e-12),
                       "value_ratio": value / max(ref_value, 1e-12)})  # fmt: skip
    return {
        "path": path, "kind": "deep", "num_virtual_tokens": prompt.num_virtual_tokens, "token_dim": prompt.token_dim,
        "init": prompt.meta.init, "shape": prompt.shape.as_dict(), "note": DEEP_NOTE, "layers": layers,
    }  # fmt: skip


def format_deep(r: dict) -> list[str]:
    s = r["shape"]
    lines = [
        f"{r['path']}: deep prompt, {r['num_virtual_tokens']} virtual tokens x {s['layers']} layers x "
        f"{s['kv_heads']} key/value heads x {s['head_dim']}, init {r['init']}",
        f"  {r['note']}",
        "  layer  key norm (real)  ratio   value norm (real)  ratio",
    ]
    for x in r["layers"]:
        lines.append(f"  {x['layer']:>5}  {x['key_norm']:7.2f} ({x['real_key_norm']:6.2f})  {x['key_ratio']:5.2f}   "
                     f"{x['value_norm']:7.2f} ({x['real_value_norm']:6.2f})  {x['value_ratio']:5.2f}")  # fmt: skip
    return [*lines, ""]


def format_inspection(result: dict) -> str:
    """The terminal rendering of :func:`inspect_paths`'s result."""
    lines = []
    for r in result["prompts"]:
        if r.get("kind") == "deep":
            lines += format_deep(r)
            lines += format_classes(r["classes"]) + [""] if r.get("classes") else []
            continue
        lines.append(
            f"{r['path']}: {r['num_virtual_tokens']} virtual tokens x {r['token_dim']}, init {r['init']}"
        )
        lines.append(
            f"  vocabulary norms: min {r['vocab_norm_min']:.3g}  median {r['vocab_norm_median']:.3g}  "
            f"max {r['vocab_norm_max']:.3g};  this prompt's mean norm {r['norm_mean']:.3g}"
        )
        moved = r["init_reconstructed"]
        lines.append(
            f"  init: {r['init_note']}"
            if moved
            else f"  distance from init: not available ({r['init_note']})"
        )
        head = "   #    norm  pct" + ("   moved  rel   cos0" if moved else "") + "  nearest tokens (cosine)"
        lines.append(head)
        for t in r["tokens"]:
            near = ", ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in t["nearest"])
            move = (
                f"  {t['distance_from_init']:6.2f}  {t['relative_distance_from_init']:4.2f}  {t['cosine_to_init']:5.2f}"
                if moved
                else ""
            )
            lines.append(
                f"  {t['index']:>2}  {t['norm']:6.2f}  {100 * t['norm_percentile']:3.0f}%{move}  {near}"
            )
        if r.get("classes"):
            lines += format_classes(r["classes"])
        lines.append("")
    if "similarity" in result:
        paths = result["similarity"]["paths"]
        lines.append(
            "similarity between prompts (cosine of mean-pooled prompts, centred on the vocabulary mean):"
        )
        for i, row in enumerate(result["similarity"]["cosine_centred"]):
            lines.append(f"  [{i}] " + "  ".join(f"{x:5.2f}" for x in row) + f"  {paths[i]}")
    lines.append(
        "pct: share of vocabulary tokens with a smaller norm; moved: L2 distance from the init "
        "(rel: divided by the init's norm); cos0: cosine to the init."
    )
    return "\n".join(lines)
