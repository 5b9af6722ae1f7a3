"""Verbalizers: dataset labels -> the words the model should say, and those words as token ids
with the way they are scored (see :mod:`softprompt.scoring`).

With many classes, label words tend to share first tokens ("card arrival", "card linking"), so
scoring needs each word's whole token sequence. :class:`LabelTrie` lays those sequences out as a
tree of shared prefixes, so each distinct prefix is run once per input; :func:`auto_verbalizer`
picks words whose first tokens differ, so one forward pass scores every class.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from softprompt.config import ScoringMode, allowed
from softprompt.errors import UsageError

if TYPE_CHECKING:
    from softprompt.learned import ClassHead

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSpace:
    """What a classification prompt chooses between: each class's label-word token ids (class
    order) and how they are scored.

    * ``first_token``: one forward pass; the log-probability of each word's first token at the last
      input position. Needs words whose first tokens differ.
    * ``sequence``: rank classification; the summed log-probability of each word's full token
      sequence appended to the input (one row per class). Works for any words.
    * ``learned``: one pass; a trainable vector per class (``head``, a
      :class:`~softprompt.learned.ClassHead`) against the last hidden state, log-softmax over the
      classes. The words only initialise the vectors.
    """

    label_ids: tuple[tuple[int, ...], ...]
    mode: str
    head: ClassHead | None = field(default=None, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.label_ids)

    @property
    def learned(self) -> bool:
        return self.mode == "learned"

    def with_head(self, head: ClassHead | None) -> LabelSpace:
        """This space scored by ``head``'s class vectors (a ``learned`` space needs one)."""
        if head is not None and head.num_classes != self.num_classes:
            raise UsageError(
                f"the learned verbalizer has {head.num_classes} class vectors but the labels are "
                f"{self.num_classes}; a learned verbalizer is used with the labels it was trained on"
            )
        return dataclasses.replace(self, head=head)

    def subset(self, classes: list[int]) -> LabelSpace:
        """The space of the classes ``classes`` only, in that order (sampled label sets)."""
        return LabelSpace(tuple(self.label_ids[c] for c in classes), self.mode)

    @functools.cached_property
    def trie(self) -> LabelTrie:
        """The scored token sequences as a prefix tree (first tokens only in ``first_token`` mode;
        empty for ``learned``, which scores no label token)."""
        if self.mode == "learned":
            return LabelTrie(())
        return LabelTrie(
            tuple(w[:1] for w in self.label_ids) if self.mode == "first_token" else self.label_ids
        )


@dataclass(frozen=True)
class TrieRows:
    """The nodes of a :class:`LabelTrie` (or of some of its subtrees) as one row of tokens to run
    after an input, and what each class reads from the row.

    ``visible[i, j]``: node i may attend to node j (j is i or one of its ancestors); every node
    also sees the whole input. ``terms`` (T, 3): rows ``(node, token, class)``, the log-probability
    of ``token`` after ``node`` adds to ``class``'s score.
    """

    tokens: torch.Tensor  # (N,)
    depth: torch.Tensor  # (N,) 1 for a label's first token, 2 for its second, ...
    visible: torch.Tensor  # (N, N) bool
    terms: torch.Tensor  # (T, 3)

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[0]


class LabelTrie:
    """Label token sequences as a tree of shared prefixes.

    A class's score is ``log p(w1 | x) + log p(w2 | x, w1) + ...``. The first term comes from the
    input's last position; each later term from the node of the prefix before it. So only the
    proper prefixes of the sequences are run (its *nodes*, each distinct one once), and only their
    positions need the LM head: "card arrival" and "card linking" share the node "card".
    """

    def __init__(self, sequences: tuple[tuple[int, ...], ...]):
        if any(not s for s in sequences):
            raise ValueError("every label needs at least one token")
        self.sequences = sequences
        self.first_tokens = tuple(s[0] for s in sequences)
        # parents before children; sorted within a depth so that a trie is the same in every process
        self.prefixes = sorted(
            {s[:k] for s in sequences for k in range(1, len(s))}, key=lambda p: (len(p), p)
        )
        self._rows: dict[tuple[int, ...] | None, TrieRows] = {}
        self.subtrees: dict[int, list[int]] = {}  # first token -> its nodes
        for i, p in enumerate(self.prefixes):
            self.subtrees.setdefault(p[0], []).append(i)

    @property
    def num_nodes(self) -> int:
        return len(self.prefixes)

    def rows(self, firsts: tuple[int, ...] | None = None) -> TrieRows:
        """The nodes under the first tokens ``firsts`` (None: all) as one row, parents first."""
        if firsts not in self._rows:
            self._rows[firsts] = self._make_rows(firsts)
        return self._rows[firsts]

    def _make_rows(self, firsts: tuple[int, ...] | None) -> TrieRows:
        keep = (
            range(self.num_nodes) if firsts is None else sorted(i for f in firsts for i in self.subtrees[f])
        )
        local = {self.prefixes[i]: k for k, i in enumerate(keep)}
        nodes = [self.prefixes[i] for i in keep]
        visible = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
        for k, p in enumerate(nodes):
            for d in range(1, len(p) + 1):  # itself and each ancestor
                visible[k, local[p[:d]]] = True
        terms = [
            (local[s[:k]], s[k], c)
            for c, s in enumerate(self.sequences)
            for k in range(1, len(s))
            if s[:k] in local
        ]
        return TrieRows(
            torch.tensor([p[-1] for p in nodes], dtype=torch.long),
            torch.tensor([len(p) for p in nodes], dtype=torch.long),
            visible,
            torch.tensor(terms, dtype=torch.long).view(-1, 3),
        )

    def split(self, max_nodes: int) -> list[tuple[int, ...] | None]:
        """Groups of whole subtrees of at most ``max_nodes`` nodes each (a larger subtree alone), as
        arguments for :meth:`rows`; ``[None]`` when the whole trie fits."""
        if self.num_nodes <= max_nodes:
            return [None]
        groups: list[list[int]] = []
        size = 0
        for first, nodes in sorted(self.subtrees.items(), key=lambda kv: -len(kv[1])):
            if groups and size + len(nodes) <= max_nodes:
                groups[-1].append(first)
                size += len(nodes)
            else:
                groups.append([first])
                size = len(nodes)
        return [tuple(g) for g in groups]

    def largest_subtree(self) -> int:
        """Nodes of the largest subtree: the fewest nodes one row must run at once."""
        return max((len(n) for n in self.subtrees.values()), default=0)


class Verbalizer:
    """Maps dataset labels to the words the model should say, e.g. ``{"0": "negative", "1": "positive"}``."""

    def __init__(self, mapping: dict[str, str]):
        if not mapping:
            raise UsageError("the verbalizer needs at least two labels, e.g. '0=negative,1=positive'")
        self.labels = [str(k) for k in mapping]
        self.words = [str(v).strip() for v in mapping.values()]
        problems = [
            f"label {k!r} maps to an empty word"
            for k, w in zip(self.labels, self.words, strict=True)
            if not w
        ]
        seen: dict[str, str] = {}
        for label, word in zip(self.labels, self.words, strict=True):
            key = word.lower()
            if key in seen:
                problems.append(f"labels {seen[key]!r} and {label!r} both map to the word {word!r}")
            seen[key] = label
        if len(self.labels) < 2:
            problems.append(f"only one label ({self.labels[0]!r}); classification needs at least two")
        if problems:
            raise UsageError("bad verbalizer: " + "; ".join(problems) + ". Give each label its own word.")

    @classmethod
    def parse(cls, spec: str | dict | list) -> Verbalizer:
        """From ``"0=negative,1=positive"``, a dict, or a list of words (labels are the words themselves)."""
        if isinstance(spec, dict):
            return cls({str(k): str(v) for k, v in spec.items()})
        if isinstance(spec, list):
            return cls({str(w): str(w) for w in spec})
        mapping = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise UsageError(
                    f"verbalizer entry {part!r} has no '='; write label=word pairs, e.g. '0=negative,1=positive'"
                )
            label, word = (x.strip() for x in part.split("=", 1))
            if label in mapping:  # a dict would keep the last silently
                raise UsageError(
                    f"verbalizer label {label!r} is given twice ({mapping[label]!r} and {word!r}); give each "
                    "label one word, e.g. '0=negative,1=positive'"
                )
            mapping[label] = word
        return cls(mapping)

    def as_dict(self) -> dict[str, str]:
        return dict(zip(self.labels, self.words, strict=True))

    def index(self, label: str) -> int:
        return self.labels.index(label)

    def token_ids(self, tokenizer) -> list[list[int]]:
        """Each word's tokens as they follow a template (with a leading space)."""
        ids = [list(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in self.words]
        empty = [w for w, t in zip(self.words, ids, strict=True) if not t]
        if empty:
            raise UsageError(f"label words {empty} tokenise to nothing; use real words")
        same = {tuple(t) for t in ids}
        if len(same) < len(ids):
            raise UsageError(f"two label words tokenise identically ({self.words}); choose distinct words")
        return ids

    def scoring_mode(self, tokenizer, requested: str = "auto") -> str:
        """``first_token`` when every word's first token is distinct (one forward pass), else ``sequence``."""
        if requested not in allowed(ScoringMode):
            raise UsageError(f"scoring={requested!r}; choose one of {', '.join(allowed(ScoringMode))}")
        firsts = [t[0] for t in self.token_ids(tokenizer)]
        distinct = len(set(firsts)) == len(firsts)
        if requested == "first_token" and not distinct:
            raise UsageError(
                f"label words {self.words} share a first token, so first_token scoring cannot tell them apart; "
                "use scoring=sequence (or auto)"
            )
        if requested == "auto":
            return "first_token" if distinct else "sequence"
        return requested  # sequence or learned: any words

    def label_space(self, tokenizer, scoring: str = "auto") -> LabelSpace:
        """The words as token ids with the scoring mode (``auto``: first_token where it can tell them apart)."""
        ids = tuple(tuple(t) for t in self.token_ids(tokenizer))
        return LabelSpace(ids, self.scoring_mode(tokenizer, scoring))


# ---------------------------------------------------------------------- choosing words automatically
# words a shortened name may not start with, and words it may not drop (they flip a label's meaning)
_FILLER = {
    "a",
    "an",
    "the",
    "of",
    "and",
    "or",
    "to",
    "in",
    "on",
    "for",
    "with",
    "by",
    "is",
    "my",
    "at",
    "from",
    "up",
}
_NEGATIONS = {"not", "no", "never", "without", "non"}


def _words(text: str) -> list[str]:
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text)  # camelCase -> camel Case
    return [w for w in re.split(r"[\s_\-./]+", text.lower()) if w]


def word_candidates(label: str) -> list[str]:
    """Phrases that could stand for ``label``, most natural first.

    The label's own words ("card_arrival" -> "card arrival"; after the last ``:`` for hierarchical
    labels, "NUM:dist" -> "dist"), then its later parts ("arrival"; never starting with a filler
    word such as "or", never dropping a "not"), its single words, and its words behind its parents'
    ("num dist"), for labels that only differ by their parent.
    """
    parts = label.split(":")
    own, parents = _words(parts[-1]) or _words(label), [w for p in parts[:-1] for w in _words(p)]
    if not own:
        return [label.strip() or label]
    found = [" ".join(own)]
    found += [
        " ".join(own[i:])
        for i in range(1, len(own))
        if own[i] not in _FILLER and not _NEGATIONS & set(own[:i])
    ]
    if not _NEGATIONS & set(own):
        found += [w for w in own if w not in _FILLER]
    if parents:
        found.append(" ".join(parents + own))
    return list(dict.fromkeys(found))


def _match(options: list[list[tuple[str, int]]]) -> list[str] | None:
    """One option per label with no first token used twice (augmenting paths), or None when impossible.
    Labels are placed in order; a label with one option keeps it."""
    owner: dict[int, int] = {}
    pick: list[str] = [""] * len(options)

    def place(i: int, seen: set[int]) -> bool:
        for word, token in options[i]:
            if token in seen:
                continue
            seen.add(token)
            if token not in owner or place(owner[token], seen):
                owner[token], pick[i] = i, word
                return True
        return False

    return pick if all(place(i, set()) for i in range(len(options))) else None


def auto_verbalizer(labels: list[str], tokenizer) -> Verbalizer:
    """Label words for ``labels`` whose first tokens all differ, so ``first_token`` scoring applies.

    Each label keeps its own name as words where no other label's name starts with the same token
    ("city"). A first token that several names share ("card" of "card arrival" and "card linking",
    "other" of ENTY:other and LOC:other) goes to none of them: they get their closest other
    candidate (see :func:`word_candidates`: "arrival", "loc other"), chosen so that every label has
    a first token of its own. When no such choice exists, each label gets its full name and scoring
    falls back to ``sequence``. The chosen mapping is logged.
    """

    def first(word: str) -> int | None:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        unknown = ids and ids[0] == getattr(tokenizer, "unk_token_id", None)
        return None if not ids or unknown else ids[0]

    options = [[(w, t) for w in word_candidates(lab) if (t := first(w)) is not None] for lab in labels]
    named = [opts[0][1] for opts in options if opts]
    contested = {t for t in named if named.count(t) > 1}
    own = [bool(opts) and opts[0][1] not in contested for opts in options]
    order = sorted(range(len(labels)), key=lambda i: not own[i])  # labels keeping their own name first
    # the others try their uncontested candidates first; a label keeping its own name keeps it
    picks = _match([options[i][:1] if own[i] else sorted(options[i], key=lambda o: o[1] in contested)
                    for i in order]) or _match([options[i] for i in order])  # fmt: skip
    if picks is not None:
        words = dict(zip((labels[i] for i in order), picks, strict=True))
        verbalizer = Verbalizer({lab: words[lab] for lab in labels})
        log.info("verbalizer auto: %d labels with distinct first tokens (first_token scoring): %s",
                 len(labels), verbalizer.as_dict())  # fmt: skip
        return verbalizer
    used: set[str] = set()
    words = {}
    for lab in labels:  # distinct names (the parents' words where needed); sequence scoring tells them apart
        cands = word_candidates(lab)
        word = next((w for w in (cands[0], cands[-1], *cands[1:-1]) if w.lower() not in used), lab)
        used.add(word.lower())
        words[lab] = word
    verbalizer = Verbalizer(words)
    log.info("verbalizer auto: no choice of words gives %d labels distinct first tokens; using their "
             "names with sequence scoring: %s", len(labels), verbalizer.as_dict())  # fmt: skip
    return verbalizer
