"""Training and held-out prose for the small default model, taken from the paper's LongBench set.

Source: ``../shared/data/longbench/*.parquet`` -- the LongBench test-time-training set of the
ReFINE paper's repository (MIT licence), 13 tasks, prompts up to 16K tokens. RULER
(``../shared/data/ruler``) is never read here except, optionally, to *remove* any LongBench
passage that also occurs in a RULER prompt (``decontaminate_dir``), so the quality benchmark on
RULER never sees text the model was trained on.

Task split (whole tasks, so the two sides can't share a document):

* ``HELDOUT_TASKS`` = gov_report, qmsum, multi_news. Long, clean English prose (government
  reports, meeting transcripts with the disfluency tags removed, news articles). They are the
  filler of the needle benchmark and the text of held-out perplexity; none of the three is a
  short-answer QA task, so nothing is lost for the LongBench QA evaluations.
* ``TRAIN_TASKS``: the remaining prose tasks -- 2wikimqa, hotpotqa, musique, multifieldqa_en,
  qasper, samsum, triviaqa, trec.
* ``CODE_TASKS`` (lcc, repobench-p) are used by neither: code is noise for a tiny prose model.

Each prompt is unwrapped into its documents: the task's instruction and trailing question are
cut off; multi-passage prompts (the Wikipedia passages of the multi-hop QA tasks, multi_news
articles) and few-shot prompts (samsum dialogues, trec questions, triviaqa passages) are split
into their units. Units repeat heavily across rows (the same Wikipedia passage or few-shot
example appears in many prompts), so they are deduplicated after light whitespace normalisation.
Few-shot units keep their own question/answer or summary (``Summary: ...``); the final, unanswered
query of a prompt is dropped. Very short trec units are grouped into documents of ~4K characters.

The exported files (``export_training_text``, ``export_heldout_text``) ship in
``refine_tta/train/data/`` so that training, tests and benchmarks run without ``../shared``:
UTF-8 text, gzip'd, documents separated by ``DOC_SEPARATOR`` (a blank line plus a form feed,
which never occurs inside a normalised document). Read them back with ``iter_documents``.

Reproduce the shipped files with::

    python -m refine_tta.train.corpus --data-dir ../shared/data/longbench \\
        --decontaminate-dir ../shared/data/ruler --out-dir refine_tta/train/data
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

TRAIN_TASKS: tuple[str, ...] = (
    "2wikimqa", "hotpotqa", "musique", "multifieldqa_en", "qasper", "samsum", "triviaqa", "trec",
)
HELDOUT_TASKS: tuple[str, ...] = ("gov_report", "qmsum", "multi_news")
CODE_TASKS: tuple[str, ...] = ("lcc", "repobench-p")

DATA_DIR = Path(__file__).parent / "data"
TRAIN_TEXT_PATH = DATA_DIR / "longbench_prose.txt.gz"
HELDOUT_TEXT_PATH = DATA_DIR / "heldout_prose.txt.gz"

# Blank line + form feed + blank line. Normalised documents contain no form feed, so splitting on
# this is exact; a tokenizer sees it only if a caller concatenates the raw file (don't).
DOC_SEPARATOR = "\n\n\f\n\n"

# Caps of the shipped files: 12M characters (~4.6 MB gz) of the ~22M characters of training prose;
# 4.5M characters of held-out prose, more than the ~3.0M characters (~1.1 MB gz) the tasks hold.
DEFAULT_TRAIN_MAX_CHARS = 12_000_000
DEFAULT_HELDOUT_MAX_CHARS = 4_500_000

_MIN_DOC_CHARS = 200          # shorter units are kept only inside grouped documents (trec, samsum)
_GROUP_CHARS = 4_000          # target size of a grouped document of short units

# --- unwrapping -------------------------------------------------------------------------------

# Where the document starts: the text after the first match (task instruction cut off).
_START = {
    "2wikimqa": r"The following are given passages\.\n",
    "hotpotqa": r"The following are given passages\.\n",
    "musique": r"The following are given passages\.\n",
    "multifieldqa_en": r"^Read the following text and answer briefly\.\n\n",
    "qasper": r"\n\nArticle: ",
    "samsum": r"The following are some examples\.\n\n",
    "triviaqa": r"The following are some examples\.\n\n",
    "trec": r"Here are some examples of questions\.\n\n",
    "gov_report": r"\n\nReport:\n",
    "qmsum": r"\n\nTranscript:\n",
    "multi_news": r"\n\nNews:\n",
}
# Where the document ends: the text before the last match (trailing instruction + question cut off).
_END = {
    "2wikimqa": r"\n\nAnswer the question based on the given passages\.",
    "hotpotqa": r"\n\nAnswer the question based on the given passages\.",
    "musique": r"\n\nAnswer the question based on the given passages\.",
    "multifieldqa_en": r"\n\nNow, answer the following question based on the above text",
    "qasper": r"\n\n ?Answer the question based on the above article",
    "gov_report": r"\n\nNow, write a one-page summary of the report\.",
    "qmsum": r"\n\nNow, answer the query based on the above meeting transcript",
    "multi_news": r"\n+Now, write a one-page summary of all the news\.",
}
# How the unwrapped text splits into units (a lookahead keeps the unit's own header).
_SPLIT = {
    "2wikimqa": r"\n*Passage \d+:\n",
    "hotpotqa": r"\n*Passage \d+:\n",
    "musique": r"\n*Passage \d+:\n",
    "multi_news": r"\n*Passage \d+:\n",
    "samsum": r"\n+(?=Dialogue: )",
    "trec": r"\n+(?=Question: )",
    "triviaqa": r"\n+(?=Passage:\n)",
}
# A few-shot unit without its answer is the prompt's own query: dropped.
_UNANSWERED = {
    "samsum": re.compile(r"\nSummary:\s*$"),
    "trec": re.compile(r"\nType:\s*$"),
    "triviaqa": re.compile(r"\nAnswer:\s*$"),
}
_GROUPED_TASKS = ("trec",)

_TRANSCRIPT_TAG = re.compile(r" ?\{(?:disfmarker|vocalsound|gap|pause|nonvocalsound|comment)\}")
_SPACE_BEFORE_PUNCT = re.compile(r" +([.,?!;:])(?=\s|$)")


def normalize_text(text: str) -> str:
    """Light whitespace normalisation: ``\\r\\n``/``\\r`` -> ``\\n``, no form feeds or other control
    characters, runs of spaces/tabs -> one space, no trailing spaces, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\f\v\x00-\x08\x0e-\x1f\x7f]", " ", text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _clean_task_text(task: str, text: str) -> str:
    """Task-specific artefacts: multi_news' ``NEWLINE_CHAR``, qmsum's ``{disfmarker}`` tags and
    tokenised punctuation (``okay .``)."""
    if task == "multi_news":
        text = text.replace(" NEWLINE_CHAR ", "\n").replace("NEWLINE_CHAR", "\n")
    if task == "qmsum":
        text = _TRANSCRIPT_TAG.sub("", text)
        text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
        text = re.sub(r"^([^:\n]{1,40}):\s*$\n?", "", text, flags=re.M)  # speaker lines left empty
    return text


def unwrap_prompt(task: str, prompt: str) -> list[str]:
    """The documents in one LongBench prompt: instruction and question removed, split into units.

    Falls back to the whole (normalised) prompt if the task's markers are not found.
    """
    text = prompt
    if task in _START:
        m = re.search(_START[task], text, flags=re.M)
        if m:
            text = text[m.end():]
    if task in _END:
        ends = list(re.finditer(_END[task], text))
        if ends:
            text = text[: ends[-1].start()]
    text = _clean_task_text(task, text)
    units = re.split(_SPLIT[task], text) if task in _SPLIT else [text]
    docs = []
    for unit in units:
        unit = normalize_text(unit)
        if not unit:
            continue
        if task in _UNANSWERED and _UNANSWERED[task].search(unit):
            continue
        docs.append(unit)
    return docs


def _group(units: Sequence[str], target_chars: int) -> list[str]:
    """Concatenate short units (one per paragraph) into documents of about ``target_chars``."""
    docs, cur, size = [], [], 0
    for unit in units:
        cur.append(unit)
        size += len(unit) + 2
        if size >= target_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def doc_hash(text: str) -> str:
    """Stable identity of a document (sha1 of its normalised text)."""
    return hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()


def load_longbench_texts(data_dir: Path, tasks: Iterable[str]) -> list[str]:
    """Deduplicated documents of ``tasks`` from ``data_dir/<task>_*.parquet``, in file/row order.

    Each prompt is unwrapped by ``unwrap_prompt``; identical documents (after normalisation) are
    kept once across all ``tasks``. Units shorter than 200 characters are dropped, except in trec,
    whose one-line units are grouped into ~4K-character documents.
    """
    import pandas as pd  # only needed to export; shipped-file readers don't import pandas

    data_dir = Path(data_dir)
    seen: set[str] = set()
    docs: list[str] = []
    for task in tasks:
        files = sorted(data_dir.glob(f"{task}_*.parquet"))
        if not files:
            raise FileNotFoundError(f"no parquet file for LongBench task {task!r} in {data_dir}")
        units: list[str] = []
        for f in files:
            df = pd.read_parquet(f, columns=["prompt", "task"])
            for prompt in df["prompt"]:
                for unit in unwrap_prompt(task, prompt):
                    h = doc_hash(unit)
                    if h not in seen:
                        seen.add(h)
                        units.append(unit)
        if task in _GROUPED_TASKS:
            units = _group(units, _GROUP_CHARS)
        docs.extend(u for u in units if len(u) >= _MIN_DOC_CHARS)
    return docs


# --- decontamination against RULER -------------------------------------------------------------

def _ruler_paragraphs(ruler_dir: Path) -> set[str]:
    """Hashes of every passage paragraph of the RULER prompts (``Document N:`` units)."""
    import pandas as pd

    hashes: set[str] = set()
    for f in sorted(Path(ruler_dir).glob("*.parquet")):
        for prompt in pd.read_parquet(f, columns=["prompt"])["prompt"]:
            for unit in re.split(r"\n*Document \d+:\n", prompt):
                for para in normalize_text(unit).split("\n"):
                    if len(para) >= 80:
                        hashes.add(doc_hash(para))
    return hashes


def decontaminate(docs: Sequence[str], ruler_dir: Path) -> list[str]:
    """``docs`` without any document that shares a paragraph (>= 80 chars) with a RULER prompt."""
    ruler = _ruler_paragraphs(ruler_dir)
    kept = [d for d in docs if not any(len(p) >= 80 and doc_hash(p) in ruler for p in d.split("\n"))]
    log.info("decontamination against RULER: dropped %d of %d documents", len(docs) - len(kept), len(docs))
    return kept


# --- shipped files -----------------------------------------------------------------------------

def _select(docs: Sequence[str], max_chars: int, seed: int) -> list[str]:
    """A seeded random subset of ``docs`` with at most ``max_chars`` characters in all."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    picked, total = [], 0
    for i in order:
        if total + len(docs[i]) > max_chars:
            continue
        picked.append(docs[i])
        total += len(docs[i])
    return picked


def write_documents(docs: Sequence[str], out_path: Path) -> None:
    """Write ``docs`` as gzip'd UTF-8 text joined by ``DOC_SEPARATOR`` (byte-reproducible: mtime 0)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = DOC_SEPARATOR.join(docs).encode("utf-8")
    with open(out_path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                    compresslevel=9, mtime=0) as gz:
        gz.write(data)


def iter_documents(path: Path) -> list[str]:
    """The documents of a file written by ``write_documents`` (``.gz`` or plain text)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return [d for d in text.split(DOC_SEPARATOR) if d]


def export_training_text(data_dir: Path, out_path: Path = TRAIN_TEXT_PATH,
                         max_chars: int = DEFAULT_TRAIN_MAX_CHARS, *,
                         decontaminate_dir: Path | None = None, seed: int = 0) -> list[str]:
    """Write the training prose (``TRAIN_TASKS``) to ``out_path``; return the documents written.

    If the tasks hold more than ``max_chars`` characters, a seeded random subset of whole
    documents is kept. ``decontaminate_dir`` (RULER parquet dir) removes overlapping passages first.
    """
    docs = load_longbench_texts(data_dir, TRAIN_TASKS)
    if decontaminate_dir is not None:
        docs = decontaminate(docs, decontaminate_dir)
    docs = _select(docs, max_chars, seed)
    write_documents(docs, out_path)
    return docs


def export_heldout_text(data_dir: Path, out_path: Path = HELDOUT_TEXT_PATH,
                        max_chars: int = DEFAULT_HELDOUT_MAX_CHARS, *, seed: int = 0) -> list[str]:
    """Write the held-out prose (``HELDOUT_TASKS``) to ``out_path``; return the documents written."""
    docs = load_longbench_texts(data_dir, HELDOUT_TASKS)
    docs = _select(docs, max_chars, seed)
    write_documents(docs, out_path)
    return docs


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: export both shipped files and print their sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/longbench"))
    parser.add_argument("--decontaminate-dir", type=Path, default=None,
                        help="RULER parquet dir: drop LongBench passages that also occur in RULER")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--train-max-chars", type=int, default=DEFAULT_TRAIN_MAX_CHARS)
    parser.add_argument("--heldout-max-chars", type=int, default=DEFAULT_HELDOUT_MAX_CHARS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_path, held_path = args.out_dir / TRAIN_TEXT_PATH.name, args.out_dir / HELDOUT_TEXT_PATH.name
    train = export_training_text(args.data_dir, train_path, args.train_max_chars,
                                 decontaminate_dir=args.decontaminate_dir)
    held = export_heldout_text(args.data_dir, held_path, args.heldout_max_chars)
    for name, docs, path in (("train", train, train_path), ("heldout", held, held_path)):
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs)):,} chars, "
              f"{path.stat().st_size:,} bytes gz -> {path}")


if __name__ == "__main__":
    main()
