"""RULER's tasks: the generated samples (answers in their documents, needles at their depths, sized in tokens, seeded),
the scorer, and `infer eval --suite ruler` end to end: its table on a tiny random model, its JSON on the SmolLM2
demo. Each task costs a real model two prefills and up to 128 greedy tokens each: one task runs on the CPU here.

The long runs (4K-32K tokens, 20 samples per task) are for the GPU: `infer eval MODEL --suite ruler`.
"""

import json
import math
import re
import subprocess
import sys
from collections import Counter

import pytest

from infer.weights.catalogue import resolve_model
from conftest import random_model_folder

from infer.cli.main import main
from infer.engine.errors import InferError
from infer.engine.measure import ruler
from infer.engine.tokenizer import Tokenizer

# A needle's share of the document's tokens before it, against its depth: needles go between whole units, and at 2K
# tokens a haystack of uuid needles or of paragraphs has only about 30 (measured: 0.065 off at worst).
DEPTH_TOLERANCE = 0.08


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return Tokenizer.from_dir(smollm2)


def _check_sample(tokenizer, sample):
    """What every sample promises: sized in tokens, its answers in its document, its needles at their depths."""
    budget = sample.length - sample.answer_tokens
    assert budget - ruler.SIZE_SLACK < len(sample.tokens) <= budget
    assert tokenizer.encode(sample.prompt, add_special_tokens=False) == sample.tokens
    assert sample.prompt.count(sample.document) == 1
    assert sample.answers and all(a in sample.document for a in sample.answers)
    start = sample.prompt.index(sample.document)
    doc_start = len(tokenizer.encode(sample.prompt[:start], add_special_tokens=False))
    doc_end = len(tokenizer.encode(sample.prompt[:start + len(sample.document)], add_special_tokens=False))
    assert len(sample.needles) == len(sample.depths) == len(sample.needle_at)
    for needle, depth, at in zip(sample.needles, sample.depths, sample.needle_at):
        assert sample.document.count(needle) == 1 and depth in ruler.DEPTHS
        assert tokenizer.decode(sample.tokens[at:]).lstrip().startswith(needle[:20])
        assert abs((at - doc_start) / (doc_end - doc_start) - depth) < DEPTH_TOLERANCE, (needle, depth, at)
    if sample.needles:  # each answer is stated by a needle
        assert all(any(a in n for n in sample.needles) for a in sample.answers)


@pytest.mark.parametrize("task", list(ruler.TASKS))
@pytest.mark.parametrize("length", [2048, 4096])
def test_samples_hide_their_answers_at_their_depths(tokenizer, task, length):
    for sample in ruler.ruler_samples(tokenizer, task, length, 2, seed=1):
        assert sample.task == task and sample.length == length
        assert sample.answer_tokens == ruler.TASKS[task].answer_tokens
        _check_sample(tokenizer, sample)


@pytest.mark.parametrize("length, common, other", [(2048, 6, 1), (4096, 30, 3)])
def test_common_words_are_the_most_repeated_list_items(tokenizer, length, common, other):
    sample = next(ruler.ruler_samples(tokenizer, "cwe", length, 1, seed=2))
    items = re.findall(r"\d+\. (\w+)", sample.document)
    assert items[:3] == sample.document.split()[1:6:2]  # the whole list is "1. word 2. word ..."
    counts = Counter(items)
    assert len(sample.answers) == 10 and all(counts[a] == common for a in sample.answers)
    assert set(counts.values()) == {common, other} and len(counts) > 10


def test_frequent_words_are_the_three_most_frequent(tokenizer):
    sample = next(ruler.ruler_samples(tokenizer, "fwe", 2048, 1, seed=2))
    counts = Counter(sample.document.split())
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert counts.most_common(1)[0][0] == "..."
    assert ranked[:3] == sample.answers and counts[ranked[2]] > counts[ranked[3]]


def test_multikey_questions_name_one_key_among_distractors(tokenizer):
    sample = next(ruler.ruler_samples(tokenizer, "niah_multikey_1", 2048, 1, seed=3))
    keys = [re.search(r"for (\S+) is", n).group(1) for n in sample.needles]
    asked = [k for k in keys if f"magic number for {k} mentioned" in sample.prompt]
    assert len(keys) == len(set(keys)) == 4 and len(asked) == 1
    assert [n for n in sample.needles if sample.answers[0] in n] == [n for n in sample.needles if asked[0] in n]


def test_variable_tracking_chain_leads_from_the_value_to_every_answer(tokenizer):
    sample = next(ruler.ruler_samples(tokenizer, "vt", 2048, 1, seed=3))
    value = re.findall(r"assigned the value (\d+) in the text above", sample.prompt)[-1]  # the example comes first
    holds = {value}
    for needle in sample.needles:  # document order: each assignment copies one that came before
        name, source = re.fullmatch(r"VAR (\w+) = (?:VAR )?(\w+)", needle).groups()
        assert source in holds
        holds.add(name)
    assert holds - {value} == set(sample.answers) and len(sample.answers) == 5


def test_qa_answer_is_stated_once_about_the_person_asked(tokenizer):
    sample = next(ruler.ruler_samples(tokenizer, "qa", 2048, 1, seed=4))
    person = re.search(r"Question: .*?([A-Z][a-z]+ [A-Z][a-z]+)", sample.prompt).group(1)
    assert sample.document.count(sample.answers[0]) == 1 and person in sample.needles[0]
    assert sample.document.count(person) == 1 and sample.document.count("Document ") > 10  # distractor paragraphs


def test_samples_follow_the_seed(tokenizer):
    first = [(s.prompt, s.answers) for s in ruler.ruler_samples(tokenizer, "niah_multivalue", 2048, 2, seed=5)]
    again = [(s.prompt, s.answers) for s in ruler.ruler_samples(tokenizer, "niah_multivalue", 2048, 2, seed=5)]
    other = [(s.prompt, s.answers) for s in ruler.ruler_samples(tokenizer, "niah_multivalue", 2048, 2, seed=6)]
    assert first == again and first[0] != first[1]
    assert all(a[1] != b[1] and a[0] != b[0] for a, b in zip(first, other))


def test_scorer_counts_the_answers_found_as_ruler_does():
    assert ruler.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert ruler.string_match_all("The numbers are 1234567 and 7654322.", ["1234567", "7654321"]) == 0.5
    assert ruler.string_match_all("I do not know.", ["1234567"]) == 0.0
    assert ruler.string_match_all("they are: abcde, FGHIJ", ["ABCDE", "fghij", "KLMNO", "PQRST"]) == 0.5
    assert ruler.string_match_part("It was Velmora, I think", ["velmora", "Gesige"]) == 1.0
    assert ruler.string_match_part("It was Velmor", ["Velmora"]) == 0.0


def test_ratio_interval_is_a_paired_bootstrap():
    assert ruler.ratio_interval([1, 1, 1], [1, 1, 1]) == (1.0, 1.0)
    low, high = ruler.ratio_interval([1] * 10, [1] * 5 + [0] * 5)
    assert 0.1 < low < 0.5 < high < 0.9
    dense, sparse = [1, 0.5, 1, 0, 1, 0.75], [1, 0.25, 0.5, 0, 1, 1]
    assert ruler.ratio_interval(dense, sparse) == ruler.ratio_interval(dense, sparse)  # seeded
    assert all(math.isnan(x) for x in ruler.ratio_interval([0, 0], [1, 0]))


def test_select_tasks_takes_names_and_families():
    assert ruler.select_tasks(None) == list(ruler.TASKS)
    assert ruler.select_tasks(["qa", "niah_multikey"]) == ["niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "qa"]
    assert len(ruler.select_tasks(["niah"])) == 8
    with pytest.raises(InferError, match="niah_single_4"):
        ruler.select_tasks(["niah_single_4"])


def test_a_length_without_room_for_the_document_is_refused(tokenizer):
    with pytest.raises(InferError, match="cwe sample of 600 tokens"):
        next(ruler.ruler_samples(tokenizer, "cwe", 600, 1))


@pytest.mark.parametrize("args, words", [
    (["--suite", "passkey,rulers"], ["--suite", "passkey, nll, ruler"]),
    (["--suite", "ruler", "--tasks", "niah_single_9"], ["niah_single_9", "vt"]),
    (["--suite", "ruler", "--samples", "0"], ["--samples"]),
    (["--tasks", "vt"], ["--suite ruler"]),
    (["--suite", "ruler", "--lengths", "9000"], ["9000", "4096"]),
    (["--suite", "ruler", "--lengths", "600", "--tasks", "cwe"], ["cwe", "600 tokens", "no room"]),
])
def test_cli_bad_input_is_one_line_before_loading(tiny, capsys, args, words):
    assert main(["eval", str(tiny), "--device", "cpu", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("infer: error:") and err.count("\n") == 1 and all(w in err for w in words), err


def infer(*args):
    return subprocess.run([sys.executable, "-m", "infer.cli.main", *args], capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(smollm2, tmp_path_factory):
    """A random two-layer llama with the demo model's tokenizer and chat template: the CLI runs in seconds."""
    return random_model_folder(tmp_path_factory.mktemp("tiny-llama"), smollm2, model_type="llama", vocab_size=49152,
                               hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def test_cli_ruler_table_beside_the_passkey(tiny):
    result = infer("eval", str(tiny), "--device", "cpu", "--suite", "passkey,ruler", "--tasks", "vt,qa", "--lengths",
                   "1024", "--samples", "2", "--depths", "0.5", "--answer-tokens", "2", "--sparse-topk", "4", "--window", "128")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "passkey retrieval" in out and "mean NLL" not in out
    assert "RULER tasks" in out and "sparse/dense" in out and "95% interval" in out and "bootstrap" in out
    for task in ("vt", "qa"):
        row = re.search(rf"│ {task} +│ +1024 │ +2 │(.*)│ +(\d+)% │", out)
        assert row and int(row.group(2)) < 50, out  # the sparse answers read part of the cache
    assert "mean of 2 tasks" in out
    assert result.stderr.decode().count("ruler ") == 4  # progress goes to stderr


def test_cli_ruler_on_the_demo_model(smollm2):
    """The real model at 2K, answered and scored: the JSON holds a row per task and length, and each sample."""
    result = infer("eval", "smollm2-135m-instruct", "--device", "cpu", "--suite", "ruler", "--lengths", "2048",
                   "--samples", "1", "--tasks", "niah_single_2", "--json")
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert out["model"] == str(resolve_model("smollm2-135m-instruct"))  # the catalogue's GGUF, run as it is
    assert out["sparse"]["mode"] == "on" and "passkey" not in out and "nll" not in out
    [row] = out["ruler"]
    assert row["task"] == "niah_single_2" and row["length"] == 2048 and len(row["samples"]) == 1
    [sample] = row["samples"]
    assert 1900 < sample["tokens"] <= 2048 - 128 and len(sample["depths"]) == len(sample["needle_at"]) == 1
    for mode in ("dense", "sparse"):
        assert 0 <= sample[f"{mode}_score"] <= 1 and row[mode] == sample[f"{mode}_score"]
        assert sample[f"{mode}_score"] == ruler.string_match_all(sample[mode], sample["answers"])
    assert row["ratio"] == row["sparse"] / row["dense"] and row["ratio_low"] <= row["ratio"] <= row["ratio_high"]
    assert sample["sparse_attention"] == "sparse" and 0 < row["kv_read"] <= 1
    assert row["dense"] == 1.0  # measured: SmolLM2 finds a single needle at 2K
