"""prepare.py: tokenizer, builtin split, packing dataloader, the evaluation metric, the cache and its errors.

In-process tests use the builtin source prepared once in the session cache (conftest.py); anything
that needs another cache or environment runs prepare.py or train.py as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

import prepare

B, T = 8, prepare.MAX_SEQ_LEN
EVAL_BATCH = 64


@pytest.fixture(scope="module")
def tokenizer(prepared_builtin):
    return prepare.Tokenizer.from_directory()


def parquet_texts(paths):
    return [text for path in paths for text in pq.read_table(path, columns=["text"]).column("text").to_pylist()]


def split_by_rule(key):
    """The documented rule, written out again: sha256(key) % 20 is 0 for val, 1 for test, else train."""
    return {0: "val", 1: "test"}.get(int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 20, "train")


@pytest.fixture(scope="module")
def eval_batches(tokenizer):
    """The (inputs, targets) evaluate() sees at EVAL_BATCH rows per step."""
    loader = prepare._packed_rows(tokenizer, EVAL_BATCH, T, "val", None, "cpu")
    steps = max(1, prepare.EVAL_TOKENS // (EVAL_BATCH * T))
    return [(x, y) for x, y, _ in islice(loader, steps)]


@pytest.fixture(scope="module")
def counted_targets(eval_batches):
    """The targets evaluate() counts (those with bytes, so not BOS) and their total byte count."""
    token_bytes = prepare.get_token_bytes()
    targets = torch.cat([y.reshape(-1) for _, y in eval_batches])
    targets = targets[token_bytes[targets] > 0]
    return targets, token_bytes[targets].sum().item()


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "def f(x):\n    return {k: v for k, v in x.items()}  # comment\n",
    "caf\u00e9 na\u00efve \u4f60\u597d \U0001f600 \u0645\u0631\u062d\u0628\u0627 e\u0301",
    " \t\n\n   \r\n\t\t  x  ",
    "",
])
def test_tokenizer_round_trips_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode([text], prepend=tokenizer.get_bos_token_id())[0]
    assert ids[0] == tokenizer.get_bos_token_id()
    assert tokenizer.decode(ids[1:]) == text


def test_token_bytes_count_each_tokens_bytes_and_zero_for_specials(tokenizer):
    token_bytes = prepare.get_token_bytes()
    enc = tokenizer.enc
    assert len(token_bytes) == tokenizer.get_vocab_size() == prepare.VOCAB_SIZE
    specials = {enc.encode_single_token(name) for name in prepare.SPECIAL_TOKENS}
    assert tokenizer.get_bos_token_id() in specials
    for i in range(enc.n_vocab):
        expected = 0 if i in specials else len(enc.decode_single_token_bytes(i))
        assert token_bytes[i].item() == expected, i
    assert (token_bytes[[i for i in range(enc.n_vocab) if i not in specials]] > 0).all()


# ---------------------------------------------------------------------------
# The builtin split
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("one, other", [("train", "val"), ("train", "test"), ("val", "test")])
def test_no_document_is_in_two_splits(prepared_builtin, one, other):
    texts = {name: set(parquet_texts(prepared_builtin[name])) for name in (one, other)}
    splits_by_text = {}
    for key, text in prepare.builtin_documents():
        splits_by_text.setdefault(text, set()).add(split_by_rule(key))
    same_text_in_both = {text for text, splits in splits_by_text.items() if {one, other} <= splits}
    assert texts[one] and texts[other]
    assert texts[one] & texts[other] == same_text_in_both


def test_val_and_test_hold_exactly_the_files_whose_path_hashes_to_0_and_1_mod_20(prepared_builtin):
    documents = list(prepare.builtin_documents())
    assert len(documents) > 100
    expected = {name: [text for key, text in documents if split_by_rule(key) == name] for name in ("train", "val", "test")}
    assert parquet_texts(prepared_builtin["val"]) == expected["val"]
    assert parquet_texts(prepared_builtin["test"]) == expected["test"]
    assert sorted(parquet_texts(prepared_builtin["train"])) == sorted(expected["train"])
    assert len(expected["test"]) > 10


def first_epoch_documents(split):
    documents = []
    for docs, epoch in prepare._document_batches(split, seed=None):
        if epoch > 1:
            return documents
        documents += docs


def test_meta_slice_shares_no_document_with_the_train_stream(prepared_builtin):
    meta, train = first_epoch_documents("meta"), first_epoch_documents("train")
    assert meta and train
    assert not set(meta) & set(train)
    assert Counter(meta) + Counter(train) == Counter(parquet_texts(prepared_builtin["train"]))


# ---------------------------------------------------------------------------
# Packing dataloader
# ---------------------------------------------------------------------------

def test_train_rows_start_with_bos_are_full_and_targets_are_shifted_inputs(tokenizer, prepared_builtin):
    bos, vocab = tokenizer.get_bos_token_id(), tokenizer.get_vocab_size()
    loader = prepare.make_dataloader(tokenizer, B, T, "train", seed=1, device="cpu")
    corpus = b"\0".join(text.encode("utf-8") for text in parquet_texts(prepared_builtin["train"]))
    for x, y, epoch in islice(loader, 3):
        assert x.shape == y.shape == (B, T) and epoch == 1
        assert (x[:, 0] == bos).all()
        assert ((x >= 0) & (x < vocab)).all() and ((y >= 0) & (y < vocab)).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
            for start, end in zip(starts, starts[1:]):
                assert tokenizer.enc.decode_bytes(row[start + 1:end]) in corpus


def test_val_stream_is_deterministic_and_ignores_the_seed(tokenizer):
    def first_batches(seed):
        loader = prepare._packed_rows(tokenizer, B, T, "val", seed, "cpu")
        return [(x, y) for x, y, _ in islice(loader, 3)]

    reference = first_batches(None)
    for other in (first_batches(None), first_batches(7)):
        assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(reference, other))


def test_train_stream_depends_on_the_seed(tokenizer):
    def first_batch(seed):
        return next(prepare.make_dataloader(tokenizer, B, T, "train", seed=seed, device="cpu"))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_a_long_document_is_spread_over_the_training_stream(tokenizer):
    """The longest document of the stream's first row group (in the builtin corpus, the 756 KB pydoc topics file
    under STREAM_SEED) could fill the first 512 rows alone; interleaved with other documents it opens only a
    small share of them, while val still streams one document after another."""
    first_docs, _ = next(prepare._document_batches("train", prepare.STREAM_SEED))
    longest = max(first_docs, key=len)
    assert len(tokenizer.encode([longest])[0]) >= 512 * T  # the premise: it alone could fill every row below
    bos = tokenizer.get_bos_token_id()
    loader = prepare.make_dataloader(tokenizer, 16, T, "train", device="cpu")
    rows = torch.cat([x for x, _, _ in islice(loader, 32)]).tolist()

    def opening_piece(row):
        end = row.index(bos, 1) if bos in row[1:] else len(row)
        return tokenizer.enc.decode(row[1:end])

    share = sum(opening_piece(row) in longest for row in rows) / len(rows)
    assert 0 < share < 0.1, share
    val_docs, _ = next(prepare._document_batches("val", None))
    first_val = tokenizer.encode(val_docs[:1])[0]
    val_rows = [x for x, _, _ in islice(prepare._packed_rows(tokenizer, 1, T, "val", None, "cpu"), 2)]
    assert [row[0, 1:].tolist() for row in val_rows] == [first_val[:T - 1], first_val[T:2 * T - 1]]


def test_train_py_reads_one_shuffled_order_whatever_its_seed(tokenizer):
    """train.py calls make_dataloader without a seed: every run sees the same shuffled stream (a seed sets
    the initialisation only), and that order is a shuffle, not the files' order."""
    def first_batches(**seed):
        loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", **seed)
        return torch.cat([x for x, _, _ in islice(loader, 3)])

    default = first_batches()
    assert torch.equal(default, first_batches())
    assert torch.equal(default, first_batches(seed=prepare.STREAM_SEED))
    assert not torch.equal(default, first_batches(seed=None))  # None: the files' order
    train_py = (Path(prepare.__file__).parent / "train.py").read_text()
    assert train_py.count("make_dataloader(") == 2 and "seed=" not in train_py.split("make_dataloader(", 1)[1][:200]


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

class InputsOnly(nn.Module):
    """Logits from a fixed table looked up by the input token; remembers every input it was given."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)
        self.seen = []

    def forward(self, idx):
        self.seen.append(idx.clone())
        return self.table[idx]


def test_uniform_logits_give_log_vocab_loss_and_bpb_from_token_bytes(tokenizer, counted_targets):
    vocab = tokenizer.get_vocab_size()
    metrics = prepare.evaluate(InputsOnly(torch.zeros(vocab, vocab)), tokenizer, EVAL_BATCH)
    targets, nbytes = counted_targets
    assert metrics["val_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert metrics["val_bpb"] == pytest.approx(math.log2(vocab) * len(targets) / nbytes, rel=1e-6)
    assert metrics["val_perplexity"] == pytest.approx(vocab, rel=1e-5)


def test_evaluate_gives_the_model_only_inputs_and_matches_a_hand_computed_cross_entropy(tokenizer, eval_batches):
    vocab = tokenizer.get_vocab_size()
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    model = InputsOnly(table)
    metrics = prepare.evaluate(model, tokenizer, EVAL_BATCH)
    token_bytes = prepare.get_token_bytes()
    logits = table.double()
    log_normalizer = logits.logsumexp(dim=-1)  # per input token, since the logits are table[input]
    prediction = table.argmax(dim=-1)
    nats = nbytes = tokens = correct = 0.0
    for x, y in eval_batches:
        mask = token_bytes[y] > 0
        nats += (log_normalizer[x] - logits[x, y])[mask].sum().item()
        nbytes += token_bytes[y].sum().item()
        tokens += mask.sum().item()
        correct += ((prediction[x] == y) & mask).sum().item()
    assert metrics["val_loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert metrics["val_bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
    assert metrics["val_accuracy"] == pytest.approx(correct / tokens, abs=1e-9)
    assert len(model.seen) == len(eval_batches)
    for seen, (x, y) in zip(model.seen, eval_batches):
        assert torch.equal(seen, x) and not torch.equal(seen, y)


def test_accuracy_of_a_constant_prediction_is_that_tokens_frequency(tokenizer, counted_targets):
    targets, _ = counted_targets
    token, count = Counter(targets.tolist()).most_common(1)[0]
    table = torch.zeros(tokenizer.get_vocab_size(), tokenizer.get_vocab_size())
    table[:, token] = 1.0
    metrics = prepare.evaluate(InputsOnly(table), tokenizer, EVAL_BATCH)
    assert metrics["val_accuracy"] == pytest.approx(count / len(targets), abs=1e-9)
    assert 0 < metrics["val_accuracy"] < 1


# ---------------------------------------------------------------------------
# The prepared cache, subprocess runs of prepare.py
# ---------------------------------------------------------------------------

def fingerprint_in(output):
    match = re.search(r"fingerprint (\S+?)[;)\s]", output)
    assert match, output
    return match.group(1)


def test_prepare_twice_reuses_the_cache_and_keeps_the_fingerprint(run_python, tmp_path):
    env = {"AUTORESEARCH_CACHE": str(tmp_path)}
    first = run_python("prepare.py", "--source", "builtin", env=env)
    second = run_python("prepare.py", "--source", "builtin", env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "already prepared" not in first.stdout
    assert "already prepared" in second.stdout
    assert re.fullmatch(r"builtin:[0-9a-f]{12}", fingerprint_in(first.stdout))
    assert fingerprint_in(first.stdout) == fingerprint_in(second.stdout)
    manifest = json.loads((tmp_path / "prepared" / "cpu" / "prepared.json").read_text())
    assert manifest["fingerprint"] == fingerprint_in(first.stdout)


def write_local_documents(folder: Path) -> list[str]:
    """200 short documents as .txt, .jsonl and .parquet files; returns their texts."""
    texts = [f"Text file {i}: the quick brown fox jumps over {i} lazy dogs.\n" for i in range(20)]
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(text)
    records = [f"Record {i} greets record {i + 1}; its number is {7 * i}." for i in range(90)]
    (folder / "records.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in records))
    rows = [f"Row {i} of the table, caf\u00e9 na\u00efve {i ** 2}" for i in range(90)]
    pq.write_table(pa.table({"text": rows}), folder / "table.parquet")
    return texts + records + rows


def test_local_source_reads_txt_jsonl_and_parquet(run_python, tmp_path):
    folder, cache = tmp_path / "docs", tmp_path / "cache"
    folder.mkdir()
    texts = write_local_documents(folder)
    result = run_python("prepare.py", "--source", f"local:{folder}", env={"AUTORESEARCH_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    manifest = json.loads((cache / "prepared" / "cpu" / "prepared.json").read_text())
    assert re.fullmatch(r"local:[0-9a-f]{12}", manifest["fingerprint"])
    train, val, test = (parquet_texts(manifest[name]) for name in ("train", "val", "test"))
    assert train and val and test
    assert Counter(train + val + test) == Counter(texts)
    assert (cache / "prepared" / "cpu" / "tokenizer.pkl").exists()


def test_local_source_without_documents_fails_with_one_sentence(run_python, assert_user_error, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("not a document type prepare.py reads")
    result = run_python("prepare.py", "--source", f"local:{tmp_path / 'docs'}",
                        env={"AUTORESEARCH_CACHE": str(tmp_path / "cache")})
    assert_user_error(result, "no .txt, .jsonl or .parquet files")


def test_local_source_that_does_not_exist_fails_with_one_sentence(run_python, assert_user_error, tmp_path):
    result = run_python("prepare.py", "--source", f"local:{tmp_path / 'missing'}",
                        env={"AUTORESEARCH_CACHE": str(tmp_path / "cache")})
    assert_user_error(result, "does not exist")


def test_unknown_source_fails_with_one_sentence(run_python, assert_user_error, tmp_path):
    result = run_python("prepare.py", "--source", "wikipedia", env={"AUTORESEARCH_CACHE": str(tmp_path)})
    assert_user_error(result, "unknown source 'wikipedia'", "builtin")


def test_unknown_preset_fails_with_one_sentence(run_python, assert_user_error, tmp_path):
    result = run_python("prepare.py", env={"AUTORESEARCH_PRESET": "tpu", "AUTORESEARCH_CACHE": str(tmp_path)})
    assert_user_error(result, "unknown preset 'tpu'", "gpu, cpu")


@pytest.mark.parametrize("budget", ["five", "0"])
def test_bad_time_budget_fails_with_one_sentence(run_python, assert_user_error, tmp_path, budget):
    result = run_python("prepare.py", env={"AUTORESEARCH_TIME_BUDGET": budget, "AUTORESEARCH_CACHE": str(tmp_path)})
    assert_user_error(result, f"AUTORESEARCH_TIME_BUDGET={budget!r}")


def test_train_without_prepared_data_says_to_run_prepare(run_python, assert_user_error, tmp_path):
    result = run_python("train.py", env={"AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_RUN_DIR": str(tmp_path / "run")})
    assert_user_error(result, "python prepare.py")
    assert not (tmp_path / "run").exists()


UNIFORM_EVAL = """
import sys
from itertools import islice
import torch
import prepare
prepare.prepare(sys.argv[1])
tokenizer = prepare.Tokenizer.from_directory()
vocab = tokenizer.get_vocab_size()
metrics = prepare.evaluate(lambda idx: torch.zeros(*idx.shape, vocab), tokenizer, 64, device="cpu")
loader = prepare._packed_rows(tokenizer, 64, prepare.MAX_SEQ_LEN, "val", None, "cpu")
steps = max(1, prepare.EVAL_TOKENS // (64 * prepare.MAX_SEQ_LEN))
targets = torch.cat([y.reshape(-1) for _, y, _ in islice(loader, steps)])
torch.save(dict(metrics=metrics, targets=targets, vocab=vocab, bos=tokenizer.get_bos_token_id()), sys.argv[2])
"""


def test_bos_targets_count_in_neither_the_loss_nor_the_bytes(run_python, tmp_path):
    """Short documents share rows, so BOS appears among the targets (the builtin val rows hold one piece each)."""
    folder, cache = tmp_path / "docs", tmp_path / "cache"
    folder.mkdir()
    write_local_documents(folder)
    result = run_python("-c", UNIFORM_EVAL, f"local:{folder}", str(tmp_path / "eval.pt"),
                        env={"AUTORESEARCH_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    run = torch.load(tmp_path / "eval.pt")
    token_bytes = torch.load(cache / "prepared" / "cpu" / "token_bytes.pt")
    targets = run["targets"]
    counted = targets[token_bytes[targets] > 0]
    assert (targets == run["bos"]).sum() > 100
    assert run["metrics"]["val_loss"] == pytest.approx(math.log(run["vocab"]), rel=1e-6)
    bpb = math.log2(run["vocab"]) * len(counted) / token_bytes[counted].sum().item()
    assert run["metrics"]["val_bpb"] == pytest.approx(bpb, rel=1e-6)
