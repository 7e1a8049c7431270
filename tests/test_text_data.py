"""seqpar.launch.text_data: raw text (jsonl, parquet, txt, a directory, a datasets save_to_disk directory) ->
token cache -> deterministic batches, checked against the tokenizer called directly on the documents."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

from seqpar.launch import text_data  # noqa: E402

WORDS = "the cat sat on a mat and dog ran far away from home in rain sun day night long context".split()


def documents(n: int, *, seed: int = 0, words: tuple[int, int] = (5, 60)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


def save_tiny_tokenizer(directory) -> None:
    """A byte-level BPE trained here with ``tokenizers`` (no download), saved with ``save_pretrained``: BOS added
    to every document, EOS ``</s>`` = id 2, fewer than 128 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(documents(40), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)


def write_jsonl(path, docs: list[str], field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def expected_ids(tokenizer_dir, docs: list[str]) -> list[list[int]]:
    """Each document as the tokenizer gives it, EOS appended: the independent reference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(directory)
    return directory


def corpus_ids(data, tokenizer_dir, cache_dir, field="text") -> list[list[int]]:
    corpus = text_data.open_corpus(data, tokenizer_path=tokenizer_dir, vocab=128, text_field=field,
                                   cache_dir=cache_dir)
    return [corpus.document(i).tolist() for i in range(corpus.num_documents)]


def test_every_input_form_gives_the_tokenizers_ids_in_reading_order(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(9, seed=1)
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    write_jsonl(root / "a.jsonl", docs[:3])
    pq.write_table(pa.table({"body": docs[3:6]}), root / "b" / "c.parquet", row_group_size=2)
    (root / "b" / "d.txt").write_text(docs[6])
    (root / "notes.md").write_text("not read")
    cache = tmp_path / "cache"
    want = expected_ids(tokenizer_dir, docs)
    assert corpus_ids(root / "a.jsonl", tokenizer_dir, cache) == want[:3]
    assert corpus_ids(root / "b" / "c.parquet", tokenizer_dir, cache, field="body") == want[3:6]
    assert corpus_ids(root / "b" / "d.txt", tokenizer_dir, cache) == want[6:7]  # a .txt file is one document
    # a datasets save_to_disk directory: Arrow stream files listed in state.json (the layout datasets writes)
    saved = tmp_path / "saved"
    saved.mkdir()
    table = pa.table({"text": docs[7:]})
    with pa.ipc.new_stream(str(saved / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (saved / "dataset_info.json").write_text("{}")
    assert corpus_ids(saved, tokenizer_dir, cache) == want[7:]
    # a directory: its text files in sorted path order (a.jsonl, b/c.parquet, b/d.txt), one text field for all
    (root / "b" / "c.parquet").unlink()
    assert corpus_ids(root, tokenizer_dir, cache) == want[:3] + want[6:7]


def test_a_datasets_save_to_disk_directory_reads_like_its_rows(tmp_path, tokenizer_dir):
    datasets = pytest.importorskip("datasets", reason="datasets not installed (the layout test above covers it)")
    docs = documents(5, seed=2)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    assert corpus_ids(tmp_path / "ds", tokenizer_dir, tmp_path / "cache") == expected_ids(tokenizer_dir, docs)


def test_the_cache_is_built_once_and_again_when_the_file_changes(tmp_path, tokenizer_dir, monkeypatch):
    path, cache = tmp_path / "c.jsonl", tmp_path / "cache"
    write_jsonl(path, documents(4))
    first = corpus_ids(path, tokenizer_dir, cache)
    calls = []
    original = text_data._tokenize_file
    monkeypatch.setattr(text_data, "_tokenize_file", lambda *a: calls.append(a) or original(*a))
    assert corpus_ids(path, tokenizer_dir, cache) == first and calls == []  # read from the cache
    docs = documents(4, seed=5)
    write_jsonl(path, docs)
    assert corpus_ids(path, tokenizer_dir, cache) == expected_ids(tokenizer_dir, docs) and len(calls) == 1


def test_bad_text_inputs_name_the_argument(tmp_path, tokenizer_dir):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, documents(2), field="content")
    with pytest.raises(ValueError, match="--text-field: .*c.jsonl:1 has no text field 'text'"):
        corpus_ids(path, tokenizer_dir, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the failed build left no partial files
    with pytest.raises(ValueError, match="--data: .* holds no .jsonl / .parquet / .txt file"):
        text_data.text_files(tmp_path / "cache")
    with pytest.raises(ValueError, match="--tokenizer: cannot load a tokenizer"):
        text_data.build_cache(path, tokenizer_path=tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="--tokenizer: .* has token id .* >= the model's vocab 10"):
        text_data.open_corpus(path, tokenizer_path=tokenizer_dir, vocab=10, text_field="content",
                              cache_dir=tmp_path / "cache")


def stream(source, steps: int) -> list[list[int]]:
    return [t.tolist() for _ in range(steps) for t in source.next_batch()]


@pytest.mark.parametrize("packing", [False, True])
def test_batches_follow_the_documents_and_resume_at_the_same_token(tmp_path, tokenizer_dir, packing):
    docs = documents(12, seed=3)
    write_jsonl(tmp_path / "c.jsonl", docs)
    corpus = text_data.open_corpus(tmp_path / "c.jsonl", tokenizer_path=tokenizer_dir, vocab=128,
                                   cache_dir=tmp_path / "cache")
    options = dict(tokens_per_step=96, max_len=24, packing=packing, seed=7)
    ids = expected_ids(tokenizer_dir, docs)
    straight = text_data.TextTokens(corpus, **options, shuffle=False)
    sequences = stream(straight, 6)
    if packing:  # the documents concatenated, cut into rows of max_len, 4 rows a step
        flat = [t for doc in ids for t in doc]
        flat = (flat * 3)[: 6 * 4 * 24]
        assert sequences == [flat[i: i + 24] for i in range(0, len(flat), 24)]
    else:  # each document in pieces of at most max_len; a 1-token tail predicts nothing and is left out
        pieces = [doc[i: i + 24] for doc in ids for i in range(0, len(doc), 24) if len(doc) - i >= 2]
        assert sequences == (pieces * 3)[: len(sequences)]
    batches = [straight.next_batch() for _ in range(4)]
    assert all(sum(map(len, b)) <= 96 for b in batches) and all(len(t) <= 24 for b in batches for t in b)
    # resume: a new source loaded with the state after step 3 gives steps 4..6 exactly
    first = text_data.TextTokens(corpus, **options, shuffle=False)
    head = stream(first, 3)
    state = json.loads(json.dumps(first.state()))  # as stored in a checkpoint manifest
    resumed = text_data.TextTokens(corpus, **options, shuffle=False)
    resumed.load_state(state)
    assert head + stream(resumed, 3) == sequences


def test_the_shuffled_order_is_a_seeded_permutation_per_epoch(tmp_path, tokenizer_dir):
    docs = documents(10, seed=4, words=(3, 6))
    write_jsonl(tmp_path / "c.jsonl", docs)
    corpus = text_data.open_corpus(tmp_path / "c.jsonl", tokenizer_path=tokenizer_dir, vocab=128,
                                   cache_dir=tmp_path / "cache")
    ids = [tuple(d) for d in expected_ids(tokenizer_dir, docs)]

    def epochs(seed):  # one step of exactly two epochs' tokens
        source = text_data.TextTokens(corpus, tokens_per_step=2 * sum(map(len, ids)), max_len=64, packing=False,
                                      seed=seed)
        return [tuple(t.tolist()) for t in source.next_batch()]

    a, b = epochs(0), epochs(1)
    assert a == epochs(0) and a != b
    assert sorted(a[:10]) == sorted(ids) and a[:10] != ids  # every document once per epoch, reordered
    assert sorted(a[10:20]) == sorted(ids) and a[10:20] != a[:10]  # the next epoch in another order


def test_the_cache_builder_command(tmp_path, tokenizer_dir, capsys):
    write_jsonl(tmp_path / "c.jsonl", documents(3))
    argv = ["--data", str(tmp_path / "c.jsonl"), "--tokenizer", str(tokenizer_dir), "--cache-dir",
            str(tmp_path / "cache")]
    assert text_data.main(argv) == 0
    want = expected_ids(tokenizer_dir, documents(3))
    assert f"1 file(s), 3 documents, {sum(map(len, want))} tokens" in capsys.readouterr().out
    tokens = np.concatenate([np.fromfile(p, dtype=np.uint32) for p in (tmp_path / "cache").glob("*.u32")])
    assert tokens.tolist() == [t for doc in want for t in doc]
