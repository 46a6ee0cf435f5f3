"""RULER-style long-context tasks (Hsieh et al., 2024, arXiv 2404.06654), answered greedily by a dense and a
block-sparse engine and scored as RULER scores them.

The tasks are RULER's, with its names, prompt wording, answer prefixes and answer lengths (tokens_to_generate):
needle in a haystack (niah_*: single, multi-key, multi-value, multi-query), variable tracking (vt), common-words
extraction (cwe), frequent-words extraction (fwe) and question answering (qa). Nothing is downloaded, so some
materials differ from RULER's:
- the "essay" haystack is eval.py's seeded filler sentences (RULER: Paul Graham's essays);
- word keys and values are adjective-noun pairs from the word lists below (RULER: wonderwords' lists; ours make
  4096 pairs, so the distractor keys of the longest niah_multikey_2 haystacks repeat, never the key asked for),
  and the words of cwe are made-up pronounceable words (RULER: English words);
- qa is over synthetic paragraphs: each states one fact about a made-up person (born in a made-up town, a cat with
  a made-up name, ...) among filler sentences; the question asks the fact of one person, and the other paragraphs
  state facts about other people (RULER: SQuAD and HotpotQA paragraphs);
- needles sit at depths drawn from RULER's grid of 40 depths in every haystack (RULER draws free positions in its
  line-based haystacks).

A sample of `length` tokens is the model's chat prompt, the task in the user turn and RULER's answer prefix
opening the assistant turn, of at most length - answer_tokens tokens: its haystack grows unit by unit (a sentence,
a line, a listed word, a word of text or a paragraph) while the prompt fits, so the prompt falls short of that by
less than one unit, under SIZE_SLACK tokens. Everything follows from the seed, the task, the length and the
sample's index.
"""

import math
import random
import string
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from ..errors import InferError
from ..generate import Engine
from ..tokenizer import Tokenizer
from ..weights import Checkpoint
from .eval import answer, filler_sentences, model_context

SIZE_SLACK = 128  # a prompt is at most this many tokens shorter than asked (one haystack unit)
DEPTHS = [round(100 * i / 39) / 100 for i in range(40)]  # RULER's needle depths: 0 to 1 in 40 steps
BOOTSTRAP_RESAMPLES = 2000  # resamplings of a row's samples behind its ratio's interval

ADJECTIVES = ("able", "amber", "azure", "bold", "brave", "brisk", "broad", "candid", "cheerful", "clever", "cosy",
              "crisp", "curly", "daring", "deep", "eager", "early", "elegant", "faint", "fancy", "fierce", "fluffy",
              "frosty", "giant", "glossy", "grand", "hasty", "hidden", "humble", "icy", "jolly", "keen", "lively",
              "lucky", "mellow", "merry", "mighty", "modest", "nimble", "noble", "odd", "pale", "plain", "polite",
              "proud", "rapid", "rare", "rough", "royal", "rusty", "sharp", "shiny", "silent", "silver", "sleepy",
              "smooth", "spicy", "steady", "sturdy", "swift", "tender", "tiny", "vivid", "wise")
NOUNS = ("anchor", "apple", "arrow", "badge", "basket", "beacon", "blanket", "bottle", "bucket", "button", "cabin",
         "candle", "canyon", "carpet", "cherry", "compass", "cookie", "crayon", "crystal", "dragon", "drum", "eagle",
         "engine", "falcon", "feather", "flute", "glove", "hammer", "helmet", "island", "jacket", "kettle", "kite",
         "ladder", "lemon", "magnet", "marble", "mirror", "otter", "paddle", "panda", "parrot", "pebble", "pencil",
         "pepper", "pillow", "pocket", "puzzle", "quilt", "rabbit", "ribbon", "rocket", "saddle", "scarf", "shovel",
         "spoon", "statue", "tiger", "tulip", "violin", "wagon", "walrus", "whistle", "zebra")
FIRST_NAMES = ("Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kaia", "Luca",
               "Mira", "Nils", "Olga", "Pavel", "Rosa", "Soren", "Talia", "Umar", "Vera", "Wim", "Yara", "Zeno")
QA_FACTS = (  # (fact, question) about a person; the value is a made-up name
    ("{name} was born in the town of {value}.", "In which town was {name} born?"),
    ("{name} keeps a cat called {value}.", "What is the name of the cat of {name}?"),
    ("{name} lives on {value} Street.", "On which street does {name} live?"),
    ("{name} once sailed on a ship named {value}.", "What was the name of the ship {name} sailed on?"),
    ("The teacher of {name} was called {value}.", "What was the teacher of {name} called?"),
)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."


@dataclass
class Parts:
    """What a task writes for one haystack size."""

    content: str  # the user turn
    answer_prefix: str  # opens the assistant turn
    document: str  # the haystack with its needles, a part of content
    needles: list[str]  # the sentences (or paragraphs) inserted into the haystack
    depths: list[float]  # where each needle sits: the fraction of the haystack's units before it
    answers: list[str]


@dataclass
class RulerSample:
    task: str
    length: int  # tokens asked for: the prompt and the answer tokens
    index: int  # the sample's number under its seed
    depths: list[float]  # one per needle (none for cwe and fwe)
    needles: list[str]  # inserted into the haystack: the answers' needles and distracting ones
    needle_at: list[int]  # token position where each needle starts (the token may hold the space before it)
    answers: list[str]  # what the answer should contain, scored by the task's metric
    document: str
    prompt: str  # the whole chat prompt, answer prefix included
    tokens: list[int]  # the prompt's tokens
    answer_tokens: int  # greedy tokens generated (RULER's tokens_to_generate)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all: the share of the answers found in the prediction, ignoring case."""
    return sum(a.lower() in prediction.lower() for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_part: 1 when any of the answers is in the prediction, ignoring case, else 0."""
    return float(any(a.lower() in prediction.lower() for a in answers))


def _draw(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _other(draw: Callable[[], str], taken: set[str]) -> str:
    """A draw that is not in `taken`."""
    while (x := draw()) in taken:
        pass
    return x


def _distinct(draw: Callable[[], str], count: int, taken: set[str] = frozenset()) -> list[str]:
    """`count` different draws, none of them in `taken`."""
    out, seen = [], set(taken)
    while len(out) < count:
        out.append(_other(draw, seen))
        seen.add(out[-1])
    return out


def _made_up_word(rng: random.Random) -> str:
    """A pronounceable word of three syllables, such as 'kabelo'."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))


def _insert(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """The units with each needle before unit int(depth * len(units)); needles at one place keep their order."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda p: p[1], reverse=True):
        out.insert(int(depth * len(units)), needle)
    return out


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


@dataclass(frozen=True)
class Niah:
    """A needle-in-a-haystack task: needles "One of the special magic numbers for KEY is: VALUE." in a haystack."""

    haystack: str  # "essay" (filler sentences), "noise" (one line repeated) or "needles" (needles of other keys)
    key: str  # kind of keys: "words" or "uuids"
    value: str  # kind of values: "numbers", "words" or "uuids"
    keys: int = 1  # needles with different keys; those not asked for distract
    values: int = 1  # values of each key, each in a needle of its own
    queries: int = 1  # keys asked for

    def __call__(self, rng: random.Random, units: int, length: int) -> Parts:
        keys = _distinct(lambda: _draw(rng, self.key), self.keys)
        values = _distinct(lambda: _draw(rng, self.value), self.keys * self.values)
        values = [values[i * self.values:(i + 1) * self.values] for i in range(self.keys)]  # [keys][values]
        needles = [NEEDLE.format(kind=self.value, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        depths = rng.sample(DEPTHS, len(needles))
        asked = rng.sample(range(self.keys), self.queries)
        answers = [v for i in asked for v in values[i]]
        if self.haystack == "essay":
            filler = list(islice(filler_sentences(rng.getrandbits(32)), units))
        elif self.haystack == "noise":
            filler = [NOISE] * units
        else:
            taken = set(keys)
            filler = [NEEDLE.format(kind=self.value, key=_other(lambda: _draw(rng, self.key), taken),
                                    value=_draw(rng, self.value)) for _ in range(units)]
        document = (" " if self.haystack == "essay" else "\n").join(_insert(filler, needles, depths))
        query = _and_list([keys[i] for i in asked])
        many = len(answers) > 1
        kind, be = (self.value, "are") if many else (self.value[:-1], "is")
        content = (f"{'Some' if many else 'A'} special magic {kind} {be} hidden within the following text. Make sure "
                   f"to memorize it. I will quiz you about the {kind} afterwards.\n{document}\n"
                   f"{'What are all' if many else 'What is'} the special magic {kind} for {query} mentioned in the "
                   f"provided text?")
        prefix = f"The special magic {kind} for {query} mentioned in the provided text {be}"
        return Parts(content, prefix, document, needles, depths, answers)


VT_HOPS = 4  # RULER's vt: one chain of five variables
VT_EXAMPLE_LINES = 16  # noise lines of the worked example before the task


def variable_tracking(rng: random.Random, units: int, length: int) -> Parts:
    """RULER's vt: a chain of assignments VAR A = 12345, VAR B = VAR A, ... hidden in noise lines, after a worked
    example; the answer names every variable that holds the value."""
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), 2 * (VT_HOPS + 1))

    def task(variables: list[str], noise_lines: int) -> tuple[str, str, str, list[str], list[float]]:
        value = rng.randint(10000, 99999)
        chain = [f"VAR {variables[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(variables, variables[1:])]
        depths = sorted(rng.sample(DEPTHS, len(chain)))
        document = "\n".join(_insert([NOISE] * noise_lines, chain, depths))
        content = (f"Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                   f"{document}\nQuestion: Find all variables that are assigned the value {value} in the text above.")
        prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {len(chain)} variables "
                  f"are assigned the value {value}, they are:")
        return content, prefix, document, chain, depths

    example, example_prefix, *_ = task(names[:VT_HOPS + 1], VT_EXAMPLE_LINES)
    content, prefix, document, chain, depths = task(names[VT_HOPS + 1:], units)
    content = f"{example}\n{example_prefix} {' '.join(names[:VT_HOPS + 1])}\n\n{content}"
    return Parts(content, prefix, document, chain, depths, names[VT_HOPS + 1:])


CWE_COMMON = 10  # words asked for


def common_words(rng: random.Random, units: int, length: int) -> Parts:
    """RULER's cwe: a numbered list of `units` different words, ten of them repeated more often than the others
    (below 4096 tokens 6 times against once, else 30 against 3), after a worked example; the answer lists the ten.
    Where numbers take a token per digit, the example and the ten words' 300 items fill most of a 4096-token prompt."""
    short = length < 4096
    example_words = _distinct(lambda: _made_up_word(rng), 20 if short else 40)
    words = _distinct(lambda: _made_up_word(rng), units, set(example_words))

    def numbered(items: list[str]) -> str:
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    def task(words: list[str], common: int, other: int) -> str:
        items = words[:CWE_COMMON] * common + words[CWE_COMMON:] * other
        rng.shuffle(items)
        return numbered(items)

    def content(document: str) -> str:
        return (f"Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                f"ones that appear most often.\n{document}\nQuestion: What are the {CWE_COMMON} most common words in "
                f"the above list?")

    prefix = f"Answer: The top {CWE_COMMON} words that appear most often in the list are:"
    example = task(example_words, *((3, 1) if short else (10, 3)))
    document = task(words, *((6, 1) if short else (30, 3)))
    text = f"{content(example)}\n{prefix} {numbered(example_words[:CWE_COMMON])}\n\n{content(document)}"
    return Parts(text, prefix, document, [], [], words[:CWE_COMMON])


def frequent_words(rng: random.Random, units: int, length: int) -> Parts:
    """RULER's fwe: `units` words of coded text drawn from a Zipf law (alpha 2) over length // 50 random six-letter
    words, the most frequent of them shown as '...'; the answer names the three most frequent coded words."""
    vocab = ["..."] + _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), max(4, length // 50) - 1)
    zeta2 = math.pi ** 2 / 6
    text = [w for rank, w in enumerate(vocab, 1) for _ in range(int(units / rank**2 / zeta2))]
    rng.shuffle(text)
    document = " ".join(text)
    content = (f"Read the following coded text and track the frequency of each coded word. Find the three most "
               f"frequently appeared coded words. {document}\nQuestion: Do not provide any explanation. Please ignore "
               f"the dots '....'. What are the three most frequently appeared words in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return Parts(content, prefix, document, [], [], vocab[1:4])


QA_FILLER = 3  # filler sentences per paragraph


def question_answering(rng: random.Random, units: int, length: int) -> Parts:
    """Question answering over `units` synthetic paragraphs, one of which holds the answer (see the module's
    docstring): the others state facts, of the same kinds, about other people."""
    filler = filler_sentences(rng.getrandbits(32))

    def paragraph(fact: str, name: str, value: str) -> str:
        sentences = list(islice(filler, QA_FILLER))
        sentences.insert(rng.randint(0, QA_FILLER), fact.format(name=name, value=value))
        return " ".join(sentences)

    def made_up_name() -> str:
        return f"{rng.choice(FIRST_NAMES)} {_made_up_word(rng).capitalize()}"

    def made_up_value() -> str:
        return _made_up_word(rng).capitalize()

    fact, question = rng.choice(QA_FACTS)
    person, value = made_up_name(), made_up_value()
    gold = paragraph(fact, person, value)
    depth = rng.choice(DEPTHS)
    others = [paragraph(rng.choice(QA_FACTS)[0], _other(made_up_name, {person}), _other(made_up_value, {value}))
              for _ in range(units)]
    document = "\n\n".join(f"Document {i + 1}:\n{p}" for i, p in enumerate(_insert(others, [gold], [depth])))
    instruction = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    content = (f"{instruction}\n\nThe following are given documents.\n\n{document}\n\n{instruction}\n\n"
               f"Question: {question.format(name=person)}")
    return Parts(content, "Answer:", document, [gold], [depth], [value])


@dataclass(frozen=True)
class Task:
    answer_tokens: int  # greedy tokens generated: RULER's tokens_to_generate
    metric: Callable[[str, list[str]], float]
    build: Callable[[random.Random, int, int], Parts]  # (the sample's random stream, haystack units, length)
    min_units: int  # the fewest haystack units that make a sample


TASKS = {  # RULER's tasks, in its order; qa stands for its qa_1 and qa_2
    "niah_single_1": Task(128, string_match_all, Niah("noise", "words", "numbers"), 8),
    "niah_single_2": Task(128, string_match_all, Niah("essay", "words", "numbers"), 8),
    "niah_single_3": Task(128, string_match_all, Niah("essay", "words", "uuids"), 8),
    "niah_multikey_1": Task(128, string_match_all, Niah("essay", "words", "numbers", keys=4), 8),
    "niah_multikey_2": Task(128, string_match_all, Niah("needles", "words", "numbers"), 8),
    "niah_multikey_3": Task(128, string_match_all, Niah("needles", "uuids", "uuids"), 8),
    "niah_multivalue": Task(128, string_match_all, Niah("essay", "words", "numbers", values=4), 8),
    "niah_multiquery": Task(128, string_match_all, Niah("essay", "words", "numbers", keys=4, queries=4), 8),
    "vt": Task(30, string_match_all, variable_tracking, 8),
    "cwe": Task(120, string_match_all, common_words, CWE_COMMON + 1),
    "fwe": Task(50, string_match_all, frequent_words, 100),  # enough words that the top three outnumber the rest
    "qa": Task(32, string_match_part, question_answering, 4),
}


def select_tasks(names: list[str] | None) -> list[str]:
    """The tasks that --tasks names, in TASKS' order: task names or their families' prefixes (niah_multikey, niah);
    all of them for None."""
    if names is None:
        return list(TASKS)
    chosen = set()
    for name in names:
        matches = [t for t in TASKS if t == name or t.startswith(name + "_")]
        if not matches:
            raise InferError(f"--tasks: no RULER task or family {name!r}; the tasks are {', '.join(TASKS)}")
        chosen.update(matches)
    if not chosen:
        raise InferError(f"--tasks is empty; name some of {', '.join(TASKS)}")
    return [t for t in TASKS if t in chosen]


def _largest_fitting(size: Callable[[int], int], budget: int, guess: int, low: int) -> int | None:
    """The largest n >= low with size(n) <= budget, where size(n) grows with n, about in proportion to it; None when
    not even `low` fits. Secant steps from `low` and `guess` towards size(n) = budget come close, a search outwards
    from there brackets the answer, a bisection finds it. `size` should cache: the search asks for some n again."""
    if size(low) > budget:
        return None
    a, b = low, max(guess, 2 * low)
    for _ in range(3):
        if size(b) == size(a):
            break
        a, b = b, max(low, b + (budget - size(b)) * (b - a) // (size(b) - size(a)))
    fits = lambda n: size(n) <= budget
    step = 1
    if fits(b):  # lo fits, hi does not
        lo = b
        while fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = lo + step
    else:
        hi = b
        while hi - step > low and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(low, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def ruler_samples(tokenizer: Tokenizer, task: str, length: int, count: int, seed: int = 0) -> Iterator[RulerSample]:
    """`count` samples of the task whose prompts, with the task's answer tokens, fit `length` tokens."""
    spec = TASKS[task]
    budget = length - spec.answer_tokens
    units = spec.min_units  # the previous sample's haystack size: the next one's is close
    for index in range(count):
        built = {}

        def size(n: int) -> int:
            if n not in built:
                parts = spec.build(random.Random(f"ruler:{seed}:{task}:{length}:{index}"), n, length)
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": parts.content}]) + parts.answer_prefix
                built[n] = parts, prompt, tokenizer.encode(prompt, add_special_tokens=False)
            return len(built[n][2])

        units = _largest_fitting(size, budget, units, spec.min_units)
        if units is None:
            raise InferError(f"a {task} sample of {length} tokens ({spec.answer_tokens} of them for the answer) leaves "
                             f"no room for its document; ask for more tokens")
        parts, prompt, tokens = built[units]
        start = prompt.index(parts.document)
        # The space before a needle shares its first token: the token count before the needle leaves it out.
        needle_at = [len(tokenizer.encode(prompt[:prompt.index(n, start)].rstrip(" "), add_special_tokens=False))
                     for n in parts.needles]
        yield RulerSample(task, length, index, parts.depths, parts.needles, needle_at, parts.answers, parts.document,
                          prompt, tokens, spec.answer_tokens)


@dataclass
class SampleResult:
    index: int
    tokens: int  # prompt tokens
    depths: list[float]
    needle_at: list[int]
    answers: list[str]  # expected
    dense: str  # the dense engine's answer
    sparse: str  # the sparse engine's answer
    dense_score: float  # the task's metric, 0 to 1
    sparse_score: float
    sparse_attention: str  # the path of the sparse engine's last answer step: "sparse" or "dense"
    kv_read: float  # share of the cached keys that step read (last layer, mean over kv heads)


def ratio_interval(dense: list[float], sparse: list[float], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(sparse) / mean(dense): the samples are drawn with replacement in
    pairs; draws whose dense mean is 0 (no ratio) are left out, and with no draw left the interval is (nan, nan)."""
    d, s = np.asarray(dense, dtype=float), np.asarray(sparse, dtype=float)
    pick = np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))
    d_mean, s_mean = d[pick].mean(1), s[pick].mean(1)
    ratios = s_mean[d_mean > 0] / d_mean[d_mean > 0]
    if not ratios.size:
        return math.nan, math.nan
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class RulerRow:
    task: str
    length: int  # tokens asked for
    samples: list[SampleResult]
    dense: float = field(init=False)  # mean score, 0 to 1
    sparse: float = field(init=False)
    ratio: float = field(init=False)  # sparse / dense (nan when dense scores 0)
    ratio_low: float = field(init=False)  # its 95% interval: ratio_interval
    ratio_high: float = field(init=False)
    kv_read: float = field(init=False)  # mean share of the KV cache read over the sparse answers (nan: none sparse)

    def __post_init__(self):
        dense, sparse = [r.dense_score for r in self.samples], [r.sparse_score for r in self.samples]
        self.dense, self.sparse = sum(dense) / len(dense), sum(sparse) / len(sparse)
        self.ratio = self.sparse / self.dense if self.dense else math.nan
        self.ratio_low, self.ratio_high = ratio_interval(dense, sparse)
        reads = [r.kv_read for r in self.samples if r.sparse_attention == "sparse"]
        self.kv_read = sum(reads) / len(reads) if reads else math.nan


def run_ruler(dense: Engine, sparse: Engine, tasks: list[str], lengths: list[int], samples: int, seed: int = 0,
              progress: Callable[[str, int, SampleResult], None] | None = None) -> list[RulerRow]:
    """One row per (task, length): both engines answer the same samples greedily, scored by the task's metric."""
    rows = []
    for task in tasks:
        metric = TASKS[task].metric
        for length in lengths:
            results = []
            for sample in ruler_samples(dense.tokenizer, task, length, samples, seed):
                dense_answer, _, _ = answer(dense, sample.tokens, sample.answer_tokens)
                sparse_answer, path, read = answer(sparse, sample.tokens, sample.answer_tokens)
                result = SampleResult(sample.index, len(sample.tokens), sample.depths, sample.needle_at, sample.answers,
                                      dense_answer, sparse_answer, metric(dense_answer, sample.answers),
                                      metric(sparse_answer, sample.answers), path, read)
                results.append(result)
                if progress:
                    progress(task, length, result)
            rows.append(RulerRow(task, length, results))
    return rows


def check_request(model_dir: Path, max_context: int | None, tasks: list[str], lengths: list[int], samples: int) -> None:
    """Validate the sizes against the model's context and tokenizer before the weights load."""
    context = model_context(model_dir, max_context)
    if not lengths:
        raise InferError("give the RULER sample lengths in tokens with --lengths")
    if samples < 1:
        raise InferError("--samples must be at least 1")
    for length in lengths:
        if not 1 <= length <= context:
            raise InferError(f"a RULER sample of {length} tokens (prompt and answer) does not fit the {context}-token "
                             f"context (1 to {context})")
    tokenizer = Checkpoint(model_dir).tokenizer()
    for task in tasks:
        next(ruler_samples(tokenizer, task, min(lengths), 1))  # raises when the prompt leaves no room
