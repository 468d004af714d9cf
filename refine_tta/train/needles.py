"""Synthetic key-value retrieval ("needles in a haystack") for training and for the quality benchmark.

A *needle* is one fact -- a key such as ``the access code for the north gate`` and a multi-token
value such as ``blue-harbor-42`` -- stated once in a long filler text and asked for at the end.
The prompt format is fixed so answers are easy to score::

    <filler ... The access code for the north gate is blue-harbor-42. ... filler>

    Question: What is the access code for the north gate? Answer:

and the expected completion is ``" " + value`` (``NeedleDocument.completion``); ``is_correct``
scores a generated completion by exact match of its first line. Training examples ask several
questions in the same format, one per line, each followed by its answer
(``Question: ... Answer: <value>``).

Everything is deterministic given the ``random.Random`` passed in; nothing reads global
randomness. Lengths are in tokens when a ``count_tokens(str) -> int`` callable is passed, else
estimated from characters with ``chars_per_token``.

Public API (what the benchmark and the training loop call):

* ``make_needle_document(rng, filler, *, n_needles, query_index, depth, target_tokens,
  count_tokens, chars_per_token, needles) -> NeedleDocument``
* ``filler_window(rng, texts, n_chars) -> str`` -- a random stretch of real prose
* ``synthetic_filler(rng, n_chars) -> str`` -- sentences from a small grammar
* ``training_example(rng, filler_texts, target_tokens, count_tokens=None, ...) -> str``
* ``sample_needles(rng, n) -> list[Needle]``, ``question_prompt(question)``, ``is_correct(completion, answer)``
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CountTokens = Callable[[str], int]

DEFAULT_CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class Needle:
    """One fact: ``statement`` (inserted in the context) states that ``key`` is ``value``;
    ``question`` asks for it; ``answer`` is exactly ``value``."""

    key: str
    value: str
    statement: str
    question: str
    answer: str


@dataclass(frozen=True)
class NeedleDocument:
    """A retrieval prompt.

    ``text`` = ``context`` + ``question_prompt(question)``: it ends with ``"Answer:"`` and the
    expected completion is ``" " + answer``. ``needles`` are all the facts stated in ``context``
    (the asked one plus distractors), in the order they appear; ``needles[query_index]`` is asked.
    ``depth`` is where the asked statement starts, as a fraction of ``len(context)`` (0 = start).
    """

    text: str
    context: str
    needles: tuple[Needle, ...]
    query_index: int
    question: str
    answer: str
    depth: float

    @property
    def completion(self) -> str:
        """The expected continuation of ``text``: a space and the value."""
        return " " + self.answer


# --- vocabulary -------------------------------------------------------------------------------

_ADJECTIVES = (
    "amber", "ancient", "azure", "bitter", "blue", "bold", "brave", "bright", "calm", "clever",
    "copper", "crimson", "dark", "distant", "dusty", "eager", "early", "emerald", "faint", "fierce",
    "frozen", "gentle", "golden", "green", "grey", "hidden", "hollow", "honest", "icy", "ivory",
    "jolly", "quiet", "lively", "lonely", "lucky", "misty", "modest", "noble", "orange", "pale",
    "proud", "purple", "rapid", "red", "rusty", "sandy", "scarlet", "silent", "silver", "slow",
    "smooth", "solar", "steady", "stormy", "sunny", "swift", "tall", "tiny", "velvet", "violet",
    "warm", "wild", "windy", "wise", "yellow", "young",
)
_NOUNS = (
    "anchor", "arrow", "badger", "banner", "basket", "beacon", "bridge", "canyon", "castle", "cedar",
    "comet", "compass", "crane", "crystal", "dolphin", "dragon", "eagle", "falcon", "feather", "forest",
    "fountain", "garden", "glacier", "harbor", "hammer", "island", "jungle", "kettle", "ladder", "lantern",
    "lemon", "lighthouse", "maple", "meadow", "mirror", "mountain", "needle", "oak", "ocean", "orchard",
    "otter", "panther", "pebble", "pepper", "pillow", "pine", "planet", "pocket", "rabbit", "river",
    "rocket", "saddle", "shadow", "spider", "spoon", "star", "storm", "sparrow", "thunder", "tiger",
    "tower", "tulip", "valley", "violin", "walnut", "whale", "willow", "window", "wolf", "zebra",
)
_CITIES = (
    "Amsterdam", "Athens", "Auckland", "Bangkok", "Barcelona", "Berlin", "Bogota", "Boston",
    "Brisbane", "Brussels", "Budapest", "Buenos Aires", "Cairo", "Cape Town", "Chicago", "Copenhagen",
    "Dublin", "Edinburgh", "Florence", "Geneva", "Hamburg", "Havana", "Helsinki", "Istanbul",
    "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "London", "Madrid", "Manila", "Marseille",
    "Melbourne", "Mexico City", "Milan", "Montreal", "Mumbai", "Munich", "Nairobi", "Naples",
    "New Delhi", "Oslo", "Paris", "Prague", "Quito", "Reykjavik", "Rio de Janeiro", "Rome",
    "San Francisco", "Santiago", "Seattle", "Seoul", "Singapore", "Stockholm", "Sydney", "Tallinn",
    "Tokyo", "Toronto", "Valencia", "Vancouver", "Venice", "Vienna", "Warsaw", "Zagreb", "Zurich",
)
_FIRST_NAMES = (
    "Aisha", "Alice", "Amara", "Ana", "Andrei", "Ben", "Carlos", "Chen", "Clara", "Daniel", "Diego",
    "Elena", "Emma", "Farah", "Felix", "Grace", "Hana", "Hugo", "Ines", "Ivan", "Jonas", "Julia",
    "Kenji", "Lara", "Leo", "Lina", "Lucas", "Maria", "Mateo", "Maya", "Mei", "Nadia", "Noah",
    "Olga", "Omar", "Priya", "Rafael", "Rosa", "Sam", "Sara", "Sofia", "Tariq", "Tom", "Vera",
    "Victor", "Yara", "Yusuf", "Zoe",
)
_LAST_NAMES = (
    "Abbott", "Alvarez", "Baker", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad",
    "Ivanova", "Jensen", "Kim", "Kowalski", "Larsen", "Lopez", "Moreau", "Nakamura", "Novak",
    "Okafor", "Olsen", "Patel", "Quinn", "Rossi", "Sato", "Schmidt", "Silva", "Tanaka", "Weber", "Zhang",
)
_PLACES = (
    "north gate", "south tower", "east warehouse", "west wing", "server room", "library vault",
    "main office", "harbor depot", "old mill", "science lab", "boat house", "wine cellar",
    "control room", "garden shed", "rooftop door", "archive room", "loading dock", "music hall",
)
_TEAMS = ("design", "finance", "research", "sales", "support", "marketing", "legal", "security")
_THINGS = ("colour", "song", "book", "dish", "flower", "animal", "word")
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O: not confused with 1 and 0


def _word_code(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{rng.randint(10, 99)}"


def _number(rng: random.Random) -> str:
    digits = rng.randint(4, 7)
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _alnum_code(rng: random.Random) -> str:
    def group(n: int) -> str:
        return "".join(rng.choice(_LETTERS + "23456789") for _ in range(n))
    return f"{group(rng.randint(2, 4))}-{group(rng.randint(2, 4))}"


def _word_pair(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"


def _city(rng: random.Random) -> str:
    return rng.choice(_CITIES)


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"


def _secret(rng: random.Random) -> str:
    return rng.choice((_word_code, _alnum_code, _number))(rng)


def _name(rng: random.Random) -> str:
    return rng.choice(_FIRST_NAMES)


# (key template, value generator); the template's fields are filled from the rng.
_KEY_KINDS: tuple[tuple[Callable[[random.Random], str], Callable[[random.Random], str]], ...] = (
    (lambda r: f"the access code for the {r.choice(_PLACES)}", _secret),
    (lambda r: f"the password of account {r.randint(1000, 9999)}", _secret),
    (lambda r: f"the PIN for locker {r.randint(1, 300)}", _number),
    (lambda r: f"{_name(r)}'s favourite city", _city),
    (lambda r: f"{_name(r)}'s lucky number", _number),
    (lambda r: f"{_name(r)}'s favourite {r.choice(_THINGS)}", _word_pair),
    (lambda r: f"the hometown of {_person(r)}", _city),
    (lambda r: f"the code name of project {r.choice(_NOUNS).capitalize()}", _word_pair),
    (lambda r: f"the serial number of machine {_alnum_code(r)}", _alnum_code),
    (lambda r: f"the phone extension of {_person(r)}", _number),
    (lambda r: f"the meeting city of the {r.choice(_TEAMS)} team", _city),
    (lambda r: f"the name of {_name(r)}'s {r.choice(('cat', 'dog', 'horse', 'parrot'))}", _name),
    (lambda r: f"the winner of the {r.randint(1950, 2030)} {r.choice(_NOUNS)} prize", _person),
    (lambda r: f"the secret word of the {r.choice(_TEAMS)} team", _word_code),
    (lambda r: f"the tracking number of parcel {r.randint(100, 999)}", _alnum_code),
    (lambda r: f"the manager of the {r.choice(_PLACES)}", _person),
)

_STATEMENTS = (
    "{K} is {v}.",
    "Remember: {k} is {v}.",
    "Remember: {k} = {v}.",
    "Note that {k} is {v}.",
    "For the record, {k}: {v}.",
    "Important: {k} is {v}.",
    "Please keep in mind that {k} is {v}.",
    "It is worth noting that {k} is {v}.",
    "By the way, {k} is {v}.",
    "{K} has been set to {v}.",
)
_QUESTIONS = (
    "What is {k}?",
    "What was {k}?",
    "According to the text, what is {k}?",
    "Recall {k}.",
    "What did the text say {k} is?",
)


def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_needle(rng: random.Random, key: str, value: str) -> Needle:
    """A needle for a given key and value, with a random statement and question template."""
    fields = {"k": key, "K": _capitalize(key), "v": value}
    return Needle(key=key, value=value, statement=rng.choice(_STATEMENTS).format(**fields),
                  question=rng.choice(_QUESTIONS).format(**fields), answer=value)


def sample_needles(rng: random.Random, n: int) -> list[Needle]:
    """``n`` random needles with pairwise distinct keys and distinct values."""
    needles: list[Needle] = []
    keys: set[str] = set()
    values: set[str] = set()
    while len(needles) < n:
        key_of, value_of = rng.choice(_KEY_KINDS)
        key, value = key_of(rng), value_of(rng)
        if key in keys or value in values:
            continue
        keys.add(key)
        values.add(value)
        needles.append(make_needle(rng, key, value))
    return needles


def question_prompt(question: str) -> str:
    """The text appended after the context: ``"\\n\\nQuestion: <question> Answer:"``."""
    return f"\n\nQuestion: {question} Answer:"


def qa_line(needle: Needle) -> str:
    """One answered question as in training examples: ``"Question: <q> Answer: <value>"``."""
    return f"Question: {needle.question} Answer: {needle.answer}"


def is_correct(completion: str, answer: str) -> bool:
    """Exact match of the completion's first line (stripped of spaces, quotes and final
    punctuation, case-insensitive) with ``answer``."""
    first = completion.strip().split("\n", 1)[0].strip()
    first = first.strip("\"'` ").rstrip(".,;:!?").strip()
    return first.casefold() == answer.casefold()


# --- filler -----------------------------------------------------------------------------------

# A sentence starts after . ! ? (optionally closing quotes/brackets) plus whitespace, or after a newline.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*[ \t]+|\n+")


def sentence_starts(text: str) -> list[int]:
    """Sorted character offsets where a sentence (or line) starts, including 0 and ``len(text)``."""
    starts = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    return sorted(set(starts))


def filler_window(rng: random.Random, texts: Sequence[str], n_chars: int) -> str:
    """About ``n_chars`` characters of prose: from a random sentence start of a random document,
    continuing into further random documents (joined by a blank line) until long enough."""
    if not any(t.strip() for t in texts):
        raise ValueError("filler_window needs at least one non-empty text")
    parts: list[str] = []
    total = 0
    first = True
    while total < n_chars:
        doc = texts[rng.randrange(len(texts))]
        start = 0
        if first:
            starts = sentence_starts(doc)[:-1]
            start = rng.choice(starts[: max(1, len(starts) * 3 // 4)])  # leave text after the start
            first = False
        piece = doc[start: start + (n_chars - total) + 200].strip()
        if not piece:
            continue
        parts.append(piece)
        total += len(piece) + 2
    return "\n\n".join(parts)


_SUBJECTS = (
    "The farmer", "A young engineer", "The old captain", "My neighbour", "The committee", "A small child",
    "The teacher", "The museum guide", "Our landlord", "The river pilot", "A travelling musician",
    "The baker", "The night guard", "Every student", "The mayor", "A tired doctor",
)
_VERBS = (
    "painted", "repaired", "described", "carried", "watched", "sold", "found", "forgot", "cleaned",
    "opened", "measured", "borrowed", "photographed", "studied", "ignored", "admired",
)
_ADVERBIALS = (
    "before sunrise", "after the long winter", "near the station", "without a word", "with great care",
    "during the festival", "in the afternoon", "on the way home", "for the second time",
    "behind the old school", "as the rain began", "while everyone was asleep",
)
_EXTRAS = (
    "Nobody seemed surprised.", "It was a quiet day.", "The weather stayed cold.",
    "Later, the story was told again.", "Most people agreed.", "The town slowly woke up.",
    "Nothing else happened that week.", "Some of them laughed.",
)


def _synthetic_sentence(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(_EXTRAS)
    obj = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {obj} {rng.choice(_ADVERBIALS)}."


def synthetic_filler(rng: random.Random, n_chars: int) -> str:
    """At least ``n_chars`` characters of grammatical nonsense: paragraphs of 3-8 simple sentences."""
    paragraphs: list[str] = []
    total = 0
    while total < n_chars:
        para = " ".join(_synthetic_sentence(rng) for _ in range(rng.randint(3, 8)))
        paragraphs.append(para)
        total += len(para) + 2
    return "\n\n".join(paragraphs)


# --- documents --------------------------------------------------------------------------------

def _insert(filler: str, statements: Sequence[str], depths: Sequence[float]) -> tuple[str, list[int]]:
    """``filler`` with each statement inserted at the sentence start nearest its depth.

    Returns the text and each statement's character offset in it (same order as ``statements``).
    """
    starts = sentence_starts(filler)
    targets = []
    for d in depths:
        goal = d * len(filler)
        i = bisect.bisect_left(starts, goal)
        targets.append(min(starts[max(0, i - 1): i + 1], key=lambda s: abs(s - goal)))
    text, offsets, prev = "", [0] * len(statements), 0
    for j in sorted(range(len(statements)), key=lambda j: (targets[j], depths[j], j)):
        text += filler[prev: targets[j]]
        if text and not text[-1].isspace():
            text += " "
        offsets[j] = len(text)
        # At a line start the statement gets its own line; inside a paragraph it is one more sentence.
        at_line_start = targets[j] > 0 and filler[targets[j] - 1] == "\n"
        text += statements[j] + ("\n" if at_line_start else " ")
        prev = targets[j]
    return (text + filler[prev:]).rstrip(), offsets


def _assemble(filler: str, needles: Sequence[Needle], depths: Sequence[float], query_index: int) -> NeedleDocument:
    """The document with all ``needles`` in ``filler``; needles re-ordered by position."""
    context, offsets = _insert(filler.rstrip(), [n.statement for n in needles], depths)
    order = sorted(range(len(needles)), key=lambda j: offsets[j])
    asked = needles[query_index]
    return NeedleDocument(
        text=context + question_prompt(asked.question),
        context=context,
        needles=tuple(needles[j] for j in order),
        query_index=order.index(query_index),
        question=asked.question,
        answer=asked.answer,
        depth=offsets[query_index] / max(1, len(context)),
    )


def _fit(filler: str, measure: Callable[[str], str], target_tokens: int, count_tokens: CountTokens | None,
         chars_per_token: float) -> str:
    """The longest prefix of ``filler`` that ends at a sentence start and keeps ``measure(prefix)``
    within ``target_tokens`` tokens (or, without ``count_tokens``, ``target_tokens * chars_per_token``
    characters).

    Searches the sentence starts by interpolation (length is nearly linear in the prefix), falling
    back to bisection when an interpolation step does not halve the bracket: a handful of
    tokenizer calls even for 8K-token prompts.
    """
    def size(prefix: str) -> float:
        text = measure(prefix)
        return count_tokens(text) if count_tokens is not None else len(text) / chars_per_token

    cuts = sentence_starts(filler)
    lo, hi = 0, len(cuts) - 1          # invariant: cuts[lo] fits (or is 0), cuts[hi] doesn't fit
    size_lo, size_hi = size(""), size(filler)
    if size_hi <= target_tokens:
        return filler
    bisect_next = False
    while hi - lo > 1:
        if bisect_next or size_hi <= size_lo:
            mid = (lo + hi) // 2
        else:
            goal = cuts[lo] + (target_tokens - size_lo) * (cuts[hi] - cuts[lo]) / (size_hi - size_lo)
            mid = min(hi - 1, max(lo + 1, bisect.bisect_right(cuts, goal) - 1))
        width = hi - lo
        value = size(filler[: cuts[mid]])
        if value <= target_tokens:
            lo, size_lo = mid, value
        else:
            hi, size_hi = mid, value
        bisect_next = (hi - lo) * 2 > width
    return filler[: cuts[lo]]


def _make_document(rng: random.Random, filler: str, needles: Sequence[Needle], query_index: int | None,
                   depth: float | None, target_tokens: int | None, count_tokens: CountTokens | None,
                   chars_per_token: float, measure: Callable[[NeedleDocument], str]) -> NeedleDocument:
    """``make_needle_document`` with the string whose length is targeted given by ``measure``."""
    if not needles:
        raise ValueError("a needle document needs at least one needle")
    if query_index is None:
        query_index = rng.randrange(len(needles))
    if not 0 <= query_index < len(needles):
        raise ValueError(f"query_index {query_index} out of range for {len(needles)} needles")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    depths = [rng.random() for _ in needles]
    if depth is not None:
        depths[query_index] = depth
    if target_tokens is not None:
        filler = _fit(filler, lambda prefix: measure(_assemble(prefix, needles, depths, query_index)),
                      target_tokens, count_tokens, chars_per_token)
    return _assemble(filler, needles, depths, query_index)


def make_needle_document(
    rng: random.Random,
    filler: str,
    *,
    n_needles: int = 1,
    query_index: int | None = None,
    depth: float | None = None,
    target_tokens: int | None = None,
    count_tokens: CountTokens | None = None,
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
    needles: Sequence[Needle] | None = None,
) -> NeedleDocument:
    """A retrieval prompt: ``n_needles`` statements inserted into ``filler``, one of them asked.

    Args:
        rng: the only source of randomness (needles, templates, depths).
        filler: prose to hide the needles in; statements go at sentence starts. Pass at least
            ``target_tokens * chars_per_token`` characters (``filler_window`` gives that);
            a shorter filler gives a shorter document.
        n_needles: facts stated (1 asked + distractors). Ignored if ``needles`` is given.
        query_index: which needle is asked, in generation order (``None``: random).
        depth: position of the asked statement in [0, 1] of the context (``None``: uniform);
            the other needles are placed uniformly at random.
        target_tokens: maximum length of the whole prompt ``text`` (context + question, no BOS).
            With ``count_tokens`` the filler is cut at the last sentence start that keeps the
            prompt within ``target_tokens`` tokens; without it, within
            ``target_tokens * chars_per_token`` characters. ``None``: use all of ``filler``.
        count_tokens: ``str -> number of tokens``, e.g. ``lambda s: len(tok.encode(s))``.
        needles: use these facts instead of sampling them.

    Returns:
        ``NeedleDocument``; ``doc.text`` ends with ``"Answer:"``, expected completion ``doc.completion``.
    """
    needles = list(needles) if needles is not None else sample_needles(rng, n_needles)
    return _make_document(rng, filler, needles, query_index, depth, target_tokens, count_tokens,
                          chars_per_token, measure=lambda doc: doc.text)


def training_example(
    rng: random.Random,
    filler_texts: Sequence[str],
    target_tokens: int,
    count_tokens: CountTokens | None = None,
    *,
    max_needles: int = 6,
    max_questions: int = 4,
    synthetic_prob: float = 0.2,
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
) -> str:
    """One training string: filler with 1..``max_needles`` facts, then 1..``max_questions`` of them
    asked and answered after a blank line, one ``"Question: <q> Answer: <value>"`` per line.

    The filler is a ``filler_window`` of ``filler_texts`` or, with probability ``synthetic_prob``
    (always if ``filler_texts`` is empty), ``synthetic_filler``. The string is at most
    ``target_tokens`` long (tokens with ``count_tokens``, else ``chars_per_token`` characters per
    token) and close to it; the caller adds BOS/EOS.
    """
    n_needles = rng.randint(1, max_needles)
    n_questions = rng.randint(1, min(max_questions, n_needles))
    needles = sample_needles(rng, n_needles)
    asked = rng.sample(range(n_needles), n_questions)
    qa = "\n\n" + "\n".join(qa_line(needles[j]) for j in asked)
    n_chars = int(target_tokens * chars_per_token * 1.5) + 200  # enough filler for any tokenizer
    if filler_texts and rng.random() >= synthetic_prob:
        filler = filler_window(rng, filler_texts, n_chars)
    else:
        filler = synthetic_filler(rng, n_chars)
    doc = _make_document(rng, filler, needles, asked[0], None, target_tokens, count_tokens, chars_per_token,
                         measure=lambda d: d.context + qa)
    return doc.context + qa
