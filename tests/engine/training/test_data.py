"""Loaders for corpora and task data: formats, column detection, labels, and actionable errors."""

import json
import re
from pathlib import Path

import pytest

from deftx_engine.errors import DataError
from deftx_engine.training.data import TaskData, describe_corpus, describe_task, load_corpus, load_task_data
from deftx_engine.training.tables import MAX_BYTES_DEFAULT, HubSource


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# --- load_corpus --------------------------------------------------------------------------------


def test_corpus_txt_strips_and_drops_blank_lines(tmp_path):
    path = write(tmp_path, "c.txt", "  Halo dunia.  \r\n\r\n\tApa kabar?\n   \nSelamat pagi.")
    assert load_corpus(path) == ["Halo dunia.", "Apa kabar?", "Selamat pagi."]
    assert load_corpus(str(path)) == ["Halo dunia.", "Apa kabar?", "Selamat pagi."]


def test_corpus_txt_accepts_bom(tmp_path):
    path = write(tmp_path, "c.txt", b"\xef\xbb\xbfsatu\ndua\n")
    assert load_corpus(path) == ["satu", "dua"]


def test_corpus_csv_uses_text_column_and_drops_blank_cells(tmp_path):
    path = write(tmp_path, "c.csv", 'id,text\n1,"Halo, dunia."\n2,  \n3,Apa kabar?\n')
    assert load_corpus(path) == ["Halo, dunia.", "Apa kabar?"]


def test_corpus_csv_single_column_needs_no_name(tmp_path):
    path = write(tmp_path, "c.csv", "kalimat\nsatu\ndua\n")
    assert load_corpus(path) == ["satu", "dua"]


def test_corpus_csv_explicit_column(tmp_path):
    path = write(tmp_path, "c.csv", "id,sentence,label\n1,satu,a\n2,dua,b\n")
    assert load_corpus(path, "sentence") == ["satu", "dua"]


def test_corpus_csv_missing_text_column_lists_columns(tmp_path):
    path = write(tmp_path, "c.csv", "id,sentence,label\n1,satu,a\n")
    message = "c.csv line 1 (header) has no column 'text'; columns are: id, sentence, label. Pass --text-column."
    with pytest.raises(DataError, match=re.escape(message)):
        load_corpus(path)


def test_corpus_csv_every_row_blank(tmp_path):
    path = write(tmp_path, "c.csv", "id,text\n1,\n2, \n")
    with pytest.raises(DataError, match=r"c\.csv has no text in column 'text'"):
        load_corpus(path)


def test_corpus_tsv(tmp_path):
    path = write(tmp_path, "c.tsv", 'text\tid\nDia bilang "halo\t1\nsatu, dua\t2\n')
    assert load_corpus(path) == ['Dia bilang "halo', "satu, dua"]


def test_corpus_jsonl_default_and_custom_key(tmp_path):
    content = jsonl({"text": " satu ", "s": "a"}, {"text": None, "s": "b"}) + "\n" + jsonl({"text": "dua", "s": "c"})
    path = write(tmp_path, "c.jsonl", content)
    assert load_corpus(path) == ["satu", "dua"]
    assert load_corpus(path, "s") == ["a", "b", "c"]


def test_corpus_jsonl_line_missing_key(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl({"text": "satu"}, {"txt": "dua"}))
    with pytest.raises(DataError, match=r"c\.jsonl line 2 has no field 'text'; fields on this line: txt"):
        load_corpus(path)


def test_corpus_jsonl_non_string_text(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl({"text": "satu"}, {"text": 42}))
    with pytest.raises(DataError, match=r"c\.jsonl line 2: field 'text' is a number, expected a string"):
        load_corpus(path)


def test_corpus_max_lines_refuses_instead_of_truncating(tmp_path):
    path = write(tmp_path, "c.txt", "a\nb\nc\n")
    assert load_corpus(path, max_lines=3) == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"c\.txt has 3 lines, more than the limit of 2\. Raise --max-lines"):
        load_corpus(path, max_lines=2)


# --- checks shared by both loaders ---------------------------------------------------------------


@pytest.fixture(params=["corpus", "task"])
def loader(request):
    return load_corpus if request.param == "corpus" else load_task_data


def test_missing_file(tmp_path, loader):
    with pytest.raises(DataError, match=r"nope\.csv does not exist"):
        loader(tmp_path / "nope.csv")


def test_directory_is_not_a_file(tmp_path, loader):
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(DataError, match=r"dir\.csv is not a file"):
        loader(tmp_path / "dir.csv")


def test_unsupported_extension_lists_supported(tmp_path):
    path = write(tmp_path, "c.xlsx", "text\nx\n")
    match = r"c\.xlsx has unsupported extension '\.xlsx'; supported: \.txt, \.csv, \.tsv, \.jsonl"
    with pytest.raises(DataError, match=match):
        load_corpus(path)
    with pytest.raises(DataError, match=r"supported: \.csv, \.tsv, \.jsonl\."):
        load_task_data(write(tmp_path, "t.txt", "x\n"))


def test_too_large_gives_size_and_limit(tmp_path, loader):
    path = write(tmp_path, "big.csv", "text,label\n" + "x,a\n" * 10)
    with pytest.raises(DataError, match=r"big\.csv is 51 bytes, over the limit of 20 bytes\. .*--max-bytes"):
        loader(path, max_bytes=20)
    assert MAX_BYTES_DEFAULT == 50 * 1024 * 1024


def test_binary_file(tmp_path, loader):
    path = write(tmp_path, "b.csv", b"text,label\n\x00\x01\x02")
    with pytest.raises(DataError, match=r"b\.csv looks like a binary file \(NUL byte at byte offset 11\)"):
        loader(path)


def test_invalid_utf8_reports_line_column_and_byte(tmp_path, loader):
    path = write(tmp_path, "l1.csv", "text,label\r\nok,a\r\n".encode() + "caf\xe9,b\n".encode("latin-1"))
    match = r"l1\.csv line 3, column 4: invalid UTF-8 byte 0xe9 \(byte offset 21\)\. Re-save"
    with pytest.raises(DataError, match=match):
        loader(path)


def test_invalid_utf8_after_bom_counts_file_bytes(tmp_path):
    path = write(tmp_path, "l2.txt", b"\xef\xbb\xbfab\xff\n")
    with pytest.raises(DataError, match=r"l2\.txt line 1, column 3: invalid UTF-8 byte 0xff \(byte offset 5\)"):
        load_corpus(path)


@pytest.mark.parametrize("content", ["", " \n\t\n\n"])
def test_empty_or_whitespace_only(tmp_path, loader, content):
    path = write(tmp_path, "e.jsonl", content)
    with pytest.raises(DataError, match=r"e\.jsonl is empty"):
        loader(path)


# --- CSV / JSONL structure -----------------------------------------------------------------------


def test_csv_ragged_row_names_line(tmp_path):
    path = write(tmp_path, "r.csv", "text,label\nsatu,a\n\ndua,b,extra\n")
    match = r"r\.csv line 4 has 3 fields but the header has 2\. .*quote fields that contain commas"
    with pytest.raises(DataError, match=match):
        load_task_data(path)


@pytest.mark.parametrize("name,text,says", [
    ("q.csv", 'text,label\n"satu,a\ndua,b\n',  # an unclosed quote is pointed out
     r"q\.csv line 2 has 1 field but .*runs on to line 3; look for an unclosed"),
    ("m.csv", 'text,label\n"satu\ndua",a\n\n,b\n',  # line numbers count multi-line fields and blank lines
     r"m\.csv line 5: field 'text' is empty"),
    ("d.csv", "text,label,text\nx,a,y\n", r"d\.csv line 1 \(header\) repeats column\(s\) text"),
    ("h.csv", "\ntext,label\nx,a\n", r"h\.csv line 1 \(header\) is blank"),
])
def test_csv_structure_errors_name_the_line(tmp_path, name, text, says):
    with pytest.raises(DataError, match=says):
        load_task_data(write(tmp_path, name, text))


def test_csv_bom_does_not_leak_into_header(tmp_path):
    path = write(tmp_path, "bom.csv", "\ufefftext,label\nsatu,a\n".encode())
    assert load_task_data(path).texts == ["satu"]


def test_jsonl_malformed_line(tmp_path, loader):
    path = write(tmp_path, "j.jsonl", jsonl({"text": "a", "label": "x"}) + '{"text": "b", "label": }\n')
    with pytest.raises(DataError, match=r"j\.jsonl line 2: not valid JSON \(Expecting value at column 24\)"):
        loader(path)


def test_jsonl_line_not_an_object(tmp_path, loader):
    path = write(tmp_path, "j.jsonl", jsonl({"text": "a", "label": "x"}) + '["b", "y"]\n')
    with pytest.raises(DataError, match=r"j\.jsonl line 2: expected a JSON object .*got an array"):
        loader(path)


# --- load_task_data ------------------------------------------------------------------------------


def test_task_csv_single_text(tmp_path):
    path = write(tmp_path, "t.csv", "id,text,label\n1, Bagus sekali ,positive\n2,Buruk,negative\n3,Lumayan,positive\n")
    td = load_task_data(path)
    assert td.texts == ["Bagus sekali", "Buruk", "Lumayan"]
    assert td.labels == ["positive", "negative", "positive"]
    assert td.label_names == ["negative", "positive"]
    assert td.text_pairs is None and not td.is_pair
    assert len(td) == 3
    assert td.source == str(path)


def test_task_jsonl_detects_premise_hypothesis(tmp_path):
    content = jsonl(
        {"premise": "P1", "hypothesis": "H1", "label": "entailment"},
        {"premise": "P2", "hypothesis": "H2", "label": "neutral"},
    )
    path = write(tmp_path, "nli.jsonl", content)
    td = load_task_data(path)
    assert td.is_pair
    assert (td.texts, td.text_pairs, td.labels) == (["P1", "P2"], ["H1", "H2"], ["entailment", "neutral"])


def test_task_tsv_detects_sentence1_sentence2(tmp_path):
    path = write(tmp_path, "p.tsv", "sentence1\tsentence2\tlabel\nA\tB\t1\nC\tD\t0\n")
    td = load_task_data(path)
    assert td.is_pair and td.texts == ["A", "C"] and td.text_pairs == ["B", "D"]


def test_task_explicit_columns(tmp_path):
    path = write(tmp_path, "t.csv", "q,a,y\nWho?,Me,yes\n")
    td = load_task_data(path, text_column="q", pair_column="a", label_column="y")
    assert (td.texts, td.text_pairs, td.labels) == (["Who?"], ["Me"], ["yes"])


def test_task_undetectable_columns_lists_what_was_found(tmp_path):
    path = write(tmp_path, "t.csv", "id,review,label\n1,ok,a\n")
    match = r"t\.csv line 1 \(header\): cannot tell which column .*columns are: id, review, label\. Pass --text-column"
    with pytest.raises(DataError, match=match):
        load_task_data(path)


@pytest.mark.parametrize(
    ("kwargs", "field", "flag"),
    [
        ({"text_column": "review"}, "review", "--text-column"),
        ({"pair_column": "hyp"}, "hyp", "--pair-column"),
        ({"label_column": "gold"}, "gold", "--label-column"),
    ],
)
def test_task_missing_named_column(tmp_path, kwargs, field, flag):
    path = write(tmp_path, "t.csv", "text,label\nx,a\n")
    match = rf"t\.csv line 1 \(header\) has no column '{field}'; columns are: text, label\. Pass {flag}\."
    with pytest.raises(DataError, match=match):
        load_task_data(path, **kwargs)


def test_task_int_labels_sort_numerically(tmp_path):
    rows = jsonl({"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 1})
    path = write(tmp_path, "t.jsonl", rows)
    td = load_task_data(path)
    assert td.labels == ["10", "2", "1"]
    assert td.label_names == ["1", "2", "10"]


def test_task_csv_digit_labels_are_ints_too(tmp_path):
    path = write(tmp_path, "t.csv", "text,label\na,10\nb,2\n")
    assert load_task_data(path).label_names == ["2", "10"]


def test_task_label_names_map_int_labels(tmp_path):
    content = jsonl({"text": "a", "label": 0}, {"text": "b", "label": 2}, {"text": "c", "label": "neutral"})
    path = write(tmp_path, "t.jsonl", content)
    td = load_task_data(path, label_names=["entailment", "neutral", "contradiction"])
    assert td.labels == ["entailment", "contradiction", "neutral"]
    assert td.label_names == ["entailment", "neutral", "contradiction"]


def test_task_numeric_label_names_match_as_text(tmp_path):
    """Star ratings 1..5: the integer 1 means "1", not label_names[1]."""
    path = write(tmp_path, "t.csv", "text,label\na,1\nb,5\n")
    assert load_task_data(path, label_names=["1", "2", "3", "4", "5"]).labels == ["1", "5"]


def test_task_int_label_out_of_range(tmp_path):
    path = write(tmp_path, "t.csv", "text,label\na,0\nb,3\n")
    with pytest.raises(DataError, match=r"t\.csv line 3: field 'label' is 3, .*must be 0\.\.2"):
        load_task_data(path, label_names=["neg", "neu", "pos"])


def test_task_label_unseen_in_training(tmp_path):
    path = write(tmp_path, "eval.csv", "text,label\na,positive\nb,mixed\n")
    match = r"eval\.csv line 3: label 'mixed' in field 'label' is not one of the known labels: negative, positive\."
    with pytest.raises(DataError, match=match):
        load_task_data(path, label_names=["negative", "positive"])


@pytest.mark.parametrize(("content", "match"), [
    ("text,label\nx,a\n  ,b\n", r"t\.csv line 3: field 'text' is empty"),
    ("text,label\nx,a\ny, \n", r"t\.csv line 3: field 'label' is empty"),
    ("premise,hypothesis,label\nx,y,a\nx,,b\n", r"t\.csv line 3: field 'hypothesis' is empty"),
])
def test_task_empty_fields(tmp_path, content, match):
    with pytest.raises(DataError, match=match):
        load_task_data(write(tmp_path, "t.csv", content))


def test_task_jsonl_missing_label_and_bad_label_type(tmp_path):
    missing = write(tmp_path, "m.jsonl", jsonl({"text": "a", "label": "x"}, {"text": "b"}))
    with pytest.raises(DataError, match=r"m\.jsonl line 2 has no field 'label'; fields on this line: text"):
        load_task_data(missing)
    floats = write(tmp_path, "f.jsonl", jsonl({"text": "a", "label": 0.5}))
    match = r"f\.jsonl line 1: field 'label' is a number; a label must be a string or an integer"
    with pytest.raises(DataError, match=match):
        load_task_data(floats)
    nulls = write(tmp_path, "n.jsonl", jsonl({"text": "a", "label": None}))
    with pytest.raises(DataError, match=r"n\.jsonl line 1: field 'label' is empty"):
        load_task_data(nulls)


def test_task_header_only(tmp_path):
    with pytest.raises(DataError, match=r"h\.csv has no data rows"):
        load_task_data(write(tmp_path, "h.csv", "text,label\n\n"))


def test_task_max_rows(tmp_path):
    path = write(tmp_path, "t.csv", "text,label\na,x\nb,y\nc,z\n")
    with pytest.raises(DataError, match=r"t\.csv has 3 rows, more than the limit of 2\. Raise --max-lines"):
        load_task_data(path, max_rows=2)


# --- TaskData and describe ----------------------------------------------------------------------


def test_label_counts_keep_label_order_and_zeros():
    td = TaskData(texts=["a", "b", "c"], labels=["pos", "neg", "pos"], label_names=["neg", "neu", "pos"])
    assert td.label_counts() == {"neg": 1, "neu": 0, "pos": 2}
    assert list(td.label_counts()) == ["neg", "neu", "pos"]


def test_task_data_rejects_misaligned_lists():
    with pytest.raises(DataError, match=r"lengths \[2, 1, 2\]"):
        TaskData(texts=["a", "b"], labels=["x"], label_names=["x"], text_pairs=["c", "d"], source="s")


def test_describe_corpus():
    lines = ["satu dua", "tiga", "empat lima enam", "a", "b", "c"]
    info = describe_corpus(lines)
    assert info == {"n_lines": 6, "n_chars": sum(map(len, lines)), "mean_words": 1.5, "sample": lines[:5]}
    assert describe_corpus([])["mean_words"] == 0.0


def test_describe_task():
    td = TaskData(texts=["a", "b"], labels=["x", "y"], label_names=["x", "y"], text_pairs=["c", "d"])
    assert describe_task(td) == {"n_rows": 2, "is_pair": True, "label_counts": {"x": 1, "y": 1}}


# --- Hub (no network: datasets.load_dataset is monkeypatched) ------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    table = {"premise": ["P1", "P2", "P3"], "hypothesis": ["H1", "H2", "H3"], "label": [0, 2, 1]}

    def load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        if name == "missing/dataset":
            raise FileNotFoundError("Dataset 'missing/dataset' doesn't exist on the Hub")
        return datasets.Dataset.from_dict(table, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, table


def test_hub_task_data_uses_class_label_names(fake_hub):
    calls, _ = fake_hub
    td = load_task_data("hub:facebook/xnli:sw@test")
    assert calls == [("facebook/xnli", "sw", "test")]
    assert td.is_pair and td.texts == ["P1", "P2", "P3"] and td.text_pairs == ["H1", "H2", "H3"]
    assert td.labels == ["entailment", "contradiction", "neutral"]
    assert td.source == "hub:facebook/xnli:sw@test"


def test_hub_class_labels_checked_against_training_names(fake_hub):
    td = load_task_data(HubSource("facebook/xnli", "sw"), label_names=["contradiction", "entailment", "neutral"])
    assert td.labels == ["entailment", "contradiction", "neutral"]


def test_hub_corpus_column_from_spec_and_argument(fake_hub):
    assert load_corpus("hub:org/nli#hypothesis") == ["H1", "H2", "H3"]
    assert load_corpus("hub:org/nli#hypothesis", "premise") == ["P1", "P2", "P3"]


def test_hub_missing_label_is_reported_by_row(fake_hub):
    _, table = fake_hub
    table["label"][1] = -1
    with pytest.raises(DataError, match=r"hub:org/nli@train row 2: field 'label' is empty"):
        load_task_data("hub:org/nli")


def test_hub_missing_column_lists_columns(fake_hub):
    match = r"hub:org/nli@train has no column 'text'; columns are: premise, hypothesis, label\. Pass --text-column"
    with pytest.raises(DataError, match=match):
        load_corpus("hub:org/nli")


def test_hub_load_failure_becomes_data_error(fake_hub):
    match = r"Could not load hub:missing/dataset@train: .*doesn't exist.*huggingface\.co/datasets/missing/dataset"
    with pytest.raises(DataError, match=match):
        load_corpus("hub:missing/dataset")


def test_hub_max_rows(fake_hub):
    with pytest.raises(DataError, match=r"hub:org/nli@train has 3 rows, more than the limit of 1"):
        load_task_data("hub:org/nli", max_rows=1)
