"""Class scores' independent reference (the plain Hugging Face model on embeddings, one row at a
time, without PromptedLM) and the inputs several scoring tests share."""

from __future__ import annotations

import torch

from softprompt.verbalizer import LabelSpace


def reference(model, prompt: torch.Tensor | None, row: list[int], space: LabelSpace) -> torch.Tensor:
    """(C,) log-scores of one input, by running the HF model on embeddings row by row."""
    emb = model.get_input_embeddings()
    P = 0 if prompt is None else prompt.shape[0]
    scores = []
    with torch.no_grad():
        for word in space.label_ids:
            x = emb(torch.tensor(row + list(word)))
            if prompt is not None:
                x = torch.cat([prompt, x])
            logp = model(inputs_embeds=x[None]).logits[0].float().log_softmax(-1)
            at = P + len(row) - 1
            if space.mode == "first_token":
                scores.append(logp[at, word[0]])
            else:
                scores.append(sum(logp[at + k, t] for k, t in enumerate(word)))
    return torch.stack(scores)


def rows_of(n: int, seed: int, head: tuple[int, ...] = ()) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [list(head) + torch.randint(3, 60, (k,), generator=g).tolist() for k in (1, 6, 2, 4, 3)[:n]]


# Labels that share prefixes at several depths, one label that is a prefix of another ((10, 11) and
# (10, 11, 12)), and one-token labels, in sequence mode.
SHARED = LabelSpace(((10, 11), (10, 13), (10, 11, 12), (20,), (20, 5, 6), (7,), (10,), (30, 5)), "sequence")
