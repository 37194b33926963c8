import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from cleantune import attacks
from cleantune.data import TextDataset, download_benchmark, load_benchmark, read_dataset
from cleantune.errors import UserError

from conftest import SHARED_DATA


def write(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    (p.write_bytes if mode == "wb" else p.write_text)(content)
    return p


def test_reads_tsv_csv_jsonl_with_string_labels(tmp_path):
    tsv = write(tmp_path, "a.tsv", "text\tlabel\ngood film\tpos\nbad film\tneg\nok film\tpos\n")
    csv_ = write(tmp_path, "a.csv", 'text,label\n"good, really",pos\nbad film,neg\n')
    jl = write(tmp_path, "a.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n')
    a = read_dataset(tsv)
    assert a.label_names == ["neg", "pos"] and a.labels == [1, 0, 1]
    b = read_dataset(csv_)
    assert b.texts[0] == "good, really" and b.labels == [1, 0]
    c = read_dataset(jl, label_names=["neg", "pos"])
    assert c.texts == ["good", "bad"] and c.labels == [1, 0]
    # JSON strings may hold U+2028/U+2029/U+0085 raw (json.dumps with ensure_ascii=False); CRLF line ends
    import json

    rows = [{"text": "a\u2028b\u0085c", "label": "pos"}, {"text": "d\u2029e", "label": "neg"}]
    raw = write(tmp_path, "raw.jsonl", "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n")
    d = read_dataset(raw)
    assert d.texts == ["a\u2028b\u0085c", "d\u2029e"] and d.labels == [1, 0]


def test_trailing_empty_csv_columns_are_read(tmp_path):
    d = read_dataset(write(tmp_path, "t.csv", "text,label,,\nhello world,0,,\nbad day,1,,\n"))
    assert d.texts == ["hello world", "bad day"] and d.label_names == ["0", "1"]


def test_integer_labels_and_custom_columns(tmp_path):
    p = write(tmp_path, "a.tsv", "review\ty\nx\t2\nz\t0\nw\t1\n")
    d = read_dataset(p, text_column="review", label_column="y")
    assert d.label_names == ["0", "1", "2"] and d.labels == [2, 0, 1]


@pytest.mark.parametrize("name,content,msg", [
    ("a.tsv", "sentence\tlabel\nfine\t1\n\t0\n", "a.tsv:3: empty text"),
    ("a.tsv", "sentence\tlbl\nfine\t1\n", "missing column 'label'"),
    ("a.tsv", "review\tlabel\nfine\t1\n", "a.tsv:1: missing column 'sentence' or 'text' (found: review, label)"),
    ("a.jsonl", '{"review": "a", "label": 1}\n', "a.jsonl:1: missing column 'sentence' or 'text'"),
    ("a.tsv", "sentence\tlabel\nfine\t1\nbad\t0\textra\n", "a.tsv:3: not a table"),
    ("a.jsonl", '{"text": "a", "label": 1}\nnot json\n', "a.jsonl:2: invalid JSON"),
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "a.jsonl:2: missing column 'label'"),
    ("a.txt", "whatever", "unsupported file type"),
    ("a.tsv", "", "empty file or missing header"),
    ("a.tsv", "sentence\tlabel\tlabel\nfine\t1\t0\n", "a.tsv:1: column 'label' appears twice"),
    ("a.tsv", "sentence\tlabel\nfine\t0\nok\t100000000\n", "a.tsv:3: label 100000000, but class 1 never occurs"),
    ("a.tsv", "sentence\tlabel\nfine\t0\nok\t-1\n", "a.tsv:3: negative label -1"),
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": [1]}\n', "a.jsonl:2: label [1] is neither"),
    # JSON true is an int to Python: it would pass as class 1
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": true}\n', "a.jsonl:2: label true is neither"),
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1.5}\n', "a.jsonl:2: label 1.5 is a number but not"),
    ("a.tsv", "sentence\tlabel\nfine\t0\nok\t1.5\n", "a.tsv:3: label 1.5 is a number but not an integer"),
    ("a.csv", "sentence,label\nfine,0\nok,1e999999999\n", "a.csv:3: label 1e999999999 is too large"),
    ("a.tsv", "sentence\tlabel\na\t0\nb\t1\nc\tpos\nd\t1\n",
     "a.tsv:4: label 'pos' is a string name, but other labels are integer class ids (e.g. '0' at line 2)"),
    ("a.jsonl", '{"text": "a", "label": "neg"}\n{"text": "b", "label": 1}\n{"text": "c", "label": "pos"}\n',
     "a.jsonl:2: label '1' is an integer class id, but other labels are string names (e.g. 'neg' at line 1)"),
    ("a.tsv", "sentence\tlabel\na\t0\nb\t1\nc\t\u00b2\n", "a.tsv:4: label '\u00b2' is a string name"),
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": 5, "label": 1}\n', "a.jsonl:2: text 5 is not a string"),
    ("a.csv", 'sentence,label\n"two\nlines",0\nok,1\n"",1\n', "a.csv:5: empty text"),
    # a JSON escape of half a UTF-16 pair: no tokenizer takes the string it decodes to
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "ok \\ud800", "label": 1}\n',
     "a.jsonl:2: invalid text (character 4 is a lone surrogate)"),
    ("a.jsonl", '{"text": "a", "label": 0, "x": ' + "[" * 100000 + "]" * 100000 + "}\n",
     "a.jsonl:1: invalid JSON (nested too deeply)"),
    ("a.tsv", "sentence\tlabel\nfine\t0\n   \t1\n", "a.tsv:3: empty text"),  # blank is empty, not a sentence
    ("a.tsv", "sentence\tlabel\nfine\t0\nok\t \n", "a.tsv:3: missing label"),  # not a class named ''
    ("a.csv", "sentence,label\nfine,0\nok,\n", "a.csv:3: missing label"),
    ("a.tsv", "sentence\tlabel\nfine\t0\nshort\n", "a.tsv:3: not a table: 1 fields where the header has 2"),
    # a quote never closed runs to the end of the file: the error names the line it opens on
    ("a.csv", 'sentence,label\nfine,0\n"unclosed,1\nok,0\n',
     "a.csv:3: not a table: a quoted field opened on this line is never closed"),
    # a quote left open that a later line's quote closes: the lenient reader glued two rows into one sample
    ("a.csv", 'text,label\n"a fine film,pos\n"a dull film",neg\ngood,pos\n',
     "a.csv:3: not a table (',' expected after '\"'; the row began on line 2, so a quote may be left open there)"),
    ("a.csv", 'text,label\n"x" y,pos\nb,neg\n', "a.csv:2: not a table (',' expected after '\"')"),
    ("a.jsonl", '{"text": "a", "label": 0}\n["b", 1]\n', "a.jsonl:2: each line must be a JSON object"),
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1, "text": "c"}\n',
     "a.jsonl:2: key 'text' appears twice in one object"),
    # zero-width spaces and control characters: the tokenizer keeps nothing of them
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "\\u200b\\u200b", "label": 1}\n',
     "a.jsonl:2: empty text (only invisible characters)"),
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": " \\u0000\\u200d ", "label": 1}\n',
     "a.jsonl:2: empty text (only invisible characters)"),
    # one id and one name: the kind that shows up later is the stray one
    ("a.tsv", "sentence\tlabel\na\t0\nb\tpos\n",
     "a.tsv:3: label 'pos' is a string name, but other labels are integer class ids (e.g. '0' at line 2)"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        read_dataset(write(tmp_path, name, content))


def test_a_folder_is_named_as_one(tmp_path):
    for name in ("data", "data.tsv"):  # "unsupported file type (none)" and "cannot read (Is a directory)" before
        (tmp_path / name).mkdir()
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / name}: a folder, not a data file")):
            read_dataset(tmp_path / name)


def test_a_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch, capsys):
    """Permissions cannot make a file unreadable here (the tests run as root): read_bytes fails as it would."""
    from cleantune.cli import main

    path = write(tmp_path, "a.tsv", "sentence\tlabel\nfine\t0\nbad\t1\n")
    real = Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(UserError, match=re.escape(f"{path}: cannot read (Permission denied)")):
        read_dataset(path)
    assert main(["train", str(path), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == f"cleantune: error: {path}: cannot read (Permission denied)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv"]


def test_one_column_cannot_be_both_text_and_label(tmp_path):
    # it would train on the labels as text (or make a class of every sentence)
    path = write(tmp_path, "a.tsv", "sentence\tlabel\nfine\t0\nbad\t1\n")
    for text_column, label_column in (("label", "label"), ("auto", "sentence")):
        with pytest.raises(UserError, match="the text and label columns are both"):
            read_dataset(path, text_column, label_column)


def test_undecodable_bytes_and_unknown_label(tmp_path):
    p = write(tmp_path, "b.tsv", b"sentence\tlabel\nok\t1\nbad \xff\xfe\t0\n", mode="wb")
    with pytest.raises(UserError, match=r"b.tsv:3: not valid UTF-8"):
        read_dataset(p)
    p = write(tmp_path, "c.tsv", "sentence\tlabel\nok\t1\nhm\t7\n")
    with pytest.raises(UserError, match=r"c.tsv:3: label '7' not in the label set"):
        read_dataset(p, label_names=["0", "1"])
    p = write(tmp_path, "d.tsv", "sentence\tlabel\nok\t1\nhm\t2\n")  # one past the last id
    with pytest.raises(UserError, match=re.escape("d.tsv:3: label '2' not in the label set (0, 1)")):
        read_dataset(p, label_names=["0", "1"])


@pytest.mark.parametrize("name,rows", [
    ("a.tsv", "sentence\tlabel\n{}\n"),
    ("a.csv", "sentence,label\n{}\n"),
    ("a.jsonl", "{}\n"),
])
def test_integral_numbers_are_class_ids_in_every_format(tmp_path, name, rows):
    labels = ["0.0", "1", "2.00", "1e0", "+2"]
    if name == "a.jsonl":
        lines = [json.dumps({"text": f"t{i}", "label": json.loads(y.lstrip("+"))}) for i, y in enumerate(labels)]
    else:
        lines = [f"t{i}{',' if name == 'a.csv' else chr(9)}{y}" for i, y in enumerate(labels)]
    d = read_dataset(write(tmp_path, name, rows.format("\n".join(lines))))
    assert d.label_names == ["0", "1", "2"] and d.labels == [round(float(y)) for y in labels]


def test_a_label_that_cannot_address_the_label_set_says_how_to_write_it(tmp_path):
    # an eval or dev file of names for a model trained on ids (or saved with transformers' LABEL_i) said only
    # "not in the label set (LABEL_0, LABEL_1)"; ids against names say that ids address ids only
    names = write(tmp_path, "names.tsv", "sentence\tlabel\na\tnegative\n")
    for ids in (["LABEL_0", "LABEL_1", "LABEL_2"], ["0", "1", "2"]):
        with pytest.raises(UserError) as e:
            read_dataset(names, label_names=ids)
        assert str(e.value) == (f"{names}:2: label 'negative' not in the label set ({', '.join(ids)}); that label set "
                                "is class ids, so write the labels as ids 0..2")
    with pytest.raises(UserError) as e:
        read_dataset(write(tmp_path, "ids.tsv", "sentence\tlabel\na\t1\n"), label_names=["neg", "pos"])
    assert str(e.value).endswith("not in the label set (neg, pos); integer labels address classes only when the "
                                 "label set is ids 0..C-1")


def test_labels_read_against_a_label_set_are_never_positions_among_names(tmp_path):
    # a dev file of 1..4 against a label set of names that look numeric: no shift by one class
    dev = write(tmp_path, "dev.tsv", "sentence\tlabel\na\t1\nb\t2\n")
    with pytest.raises(UserError, match=re.escape("dev.tsv:2: label '1' not in the label set (1.0, 2.0, 3.0)")):
        read_dataset(dev, label_names=["1.0", "2.0", "3.0"])
    with pytest.raises(UserError, match=re.escape("dev.tsv:2: label '1' not in the label set (neg, pos)")):
        read_dataset(dev, label_names=["neg", "pos"])
    # names written as saved still match, and ids address a label set of ids, however the number is written
    same = write(tmp_path, "same.tsv", "sentence\tlabel\na\t2.0\nb\t1.0\n")
    assert read_dataset(same, label_names=["1.0", "2.0", "3.0"]).labels == [1, 0]
    assert read_dataset(same, label_names=["0", "1", "2"]).labels == [2, 1]
    assert read_dataset(dev, label_names=["LABEL_0", "LABEL_1", "LABEL_2"]).labels == [1, 2]


def test_train_then_dev_labels_map_the_same_way(tmp_path):
    # what `cleantune train --dev` and `eval` do: the dev file is read against the training label set
    train = read_dataset(write(tmp_path, "t.jsonl", "".join(json.dumps({"text": f"t{i}", "label": y}) + "\n"
                                                           for i, y in enumerate([0.0, 1.0, 2.0, 1.0]))))
    dev = read_dataset(write(tmp_path, "d.csv", "text,label\nx,2\ny,0.0\nz,1\n"), label_names=train.label_names)
    assert [dev.label_names[i] for i in dev.labels] == ["2", "0", "1"]


def test_benchmarks_load_with_manifest_counts():
    manifest = json.loads((SHARED_DATA / "MANIFEST.json").read_text())
    b = load_benchmark("sst2")
    assert (len(b.train), len(b.dev), len(b.test)) == tuple(manifest["rows"]["sst2"][s] for s in ("train", "dev", "test"))
    assert load_benchmark("agnews").train.num_labels == 4
    with pytest.raises(UserError, match="unknown dataset 'imdb'"):
        load_benchmark("imdb")


def test_stratified_sample_keeps_proportions_and_is_seeded():
    train = load_benchmark("sst2").train
    a, b, c = (train.stratified_sample(500, s) for s in (0, 0, 1))
    assert len(a) == 500 and a.texts == b.texts and a.texts != c.texts
    share = sum(train.labels) / len(train)
    assert abs(sum(a.labels) / 500 - share) < 0.003


def test_stratified_sample_keeps_file_order():
    # drawn class by class, but returned in file order: batches and poison draws must not see the classes in blocks
    ds = TextDataset([f"s{i}" for i in range(300)], [int(i % 3 == 0) for i in range(300)], ["a", "b"])
    rows = [int(t[1:]) for t in ds.stratified_sample(60, 0).texts]
    assert rows == sorted(rows) and len(set(rows)) == 60


def test_text_dataset_refuses_columns_of_different_lengths():
    with pytest.raises(ValueError, match="same length"):
        TextDataset(["a"], [0, 1], ["x", "y"])
    with pytest.raises(ValueError, match="same length"):
        TextDataset(["a", "b"], [0, 1], ["x", "y"], [True])


def test_text_dataset_takes_array_columns_as_lists_and_refuses_unordered_ones():
    """numpy arrays and pandas columns passed the checks, then failed deep inside: repr (an array has no
    .count), evaluate (an array's truth value), subset and stratified_sample (a Series indexed 5, 6 has no 0)."""
    import numpy as np

    class Column:  # what matters of a pandas Series here: labels as its index, and tolist()
        def __init__(self, values, index):
            self.values, self.index = list(values), list(index)

        def __len__(self):
            return len(self.values)

        def __iter__(self):
            return iter(self.values)

        def __getitem__(self, key):
            return self.values[self.index.index(key)]

        def tolist(self):
            return list(self.values)

    for texts, labels in ((np.array(["good", "bad", "fine", "awful"]), np.array([1, 0, 1, 0])),
                          (Column(["good", "bad", "fine", "awful"], [5, 6, 7, 8]), Column([1, 0, 1, 0], [5, 6, 7, 8]))):
        ds = TextDataset(texts, labels, np.array(["negative", "positive"]), np.array([True, False, False, False]))
        assert (ds.texts, ds.labels, ds.label_names) == (["good", "bad", "fine", "awful"], [1, 0, 1, 0],
                                                         ["negative", "positive"])
        assert all(type(y) is int for y in ds.labels) and ds.poisoned == [True, False, False, False]
        assert repr(ds) == "TextDataset(4 texts; negative: 2, positive: 2; 1 poisoned)"
        assert ds.subset([0]).texts == ["good"] and len(ds.stratified_sample(2, 0)) == 2
    for odd in ({"good": 1, "bad": 0}, {"good", "bad"}):  # a dict's keys, a set's arbitrary order
        with pytest.raises(TypeError, match=f"TextDataset: texts must be a list, got {type(odd).__name__}"):
            TextDataset(odd, [1, 0], ["n", "p"])


def test_without_flags_hides_the_poison_ground_truth():
    ds = TextDataset(["a", "b", "c"], [0, 1, 1], ["x", "y"], [True, False, True])
    view = ds.without_flags()
    assert view.poisoned == [False, False, False] and (view.texts, view.labels) == (ds.texts, ds.labels)
    assert ds.poisoned == [True, False, True]  # the ground truth stays with the caller for the metrics


def test_download_from_file_mirror_verifies_sha256(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED_DATA / "olid", mirror / "olid")
    dest = tmp_path / "cache"
    download_benchmark("olid", dest, base_url=mirror.as_uri())
    got = hashlib.sha256((dest / "olid" / "dev.tsv").read_bytes()).hexdigest()
    assert got == json.loads((SHARED_DATA / "MANIFEST.json").read_text())["sha256"]["olid/dev.tsv"]
    # a corrupted mirror file is rejected and nothing is written in its place
    (mirror / "olid" / "test.tsv").write_text("sentence\tlabel\ntampered\t1\n")
    dest2 = tmp_path / "cache2"
    with pytest.raises(UserError, match="does not match MANIFEST"):
        download_benchmark("olid", dest2, base_url=mirror.as_uri())
    assert not (dest2 / "olid" / "test.tsv").exists()
    assert (dest2 / "olid" / "dev.tsv").is_file()  # verified before the failure: kept for the next try
    # a mirror that serves nothing leaves no empty folders in the cache, up to the first that existed
    (tmp_path / "cache3").mkdir()
    with pytest.raises(UserError, match="cannot download"):
        download_benchmark("olid", tmp_path / "cache3" / "a" / "b", base_url=(tmp_path / "none").as_uri())
    assert list((tmp_path / "cache3").iterdir()) == []


def test_data_root_env_and_download_fallback(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED_DATA / "sst2", mirror / "sst2")
    monkeypatch.setenv("CLEANTUNE_DATA", str(mirror))
    assert len(load_benchmark("sst2").dev) == 872
    monkeypatch.setenv("CLEANTUNE_DATA", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="CLEANTUNE_DATA"):
        load_benchmark("sst2")


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """No ../shared/data and no CLEANTUNE_DATA: benchmarks come from a file:// mirror of olid."""
    from cleantune import data

    monkeypatch.setattr(data, "_project_data_dir", lambda: None)
    monkeypatch.delenv("CLEANTUNE_DATA", raising=False)
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED_DATA / "olid", mirror / "olid")
    monkeypatch.setenv("CLEANTUNE_DATA_URL", mirror.as_uri())
    return mirror


def test_missing_benchmark_downloads_into_the_user_cache_and_is_read_there(tmp_path, monkeypatch, no_local_data):
    import os

    source = tmp_path / "readonly-source"
    source.mkdir()
    monkeypatch.setenv("CLEANTUNE_DATA", str(source))  # holds no olid: a source is read, never written
    old = os.umask(0o022)
    try:
        assert len(load_benchmark("olid").dev) == 1323
    finally:
        os.umask(old)
    assert list(source.iterdir()) == []
    cached = tmp_path / "xdg-cache" / "cleantune" / "data" / "olid"  # conftest's XDG_CACHE_HOME
    assert (cached / "train.tsv").is_file()
    assert {oct(p.stat().st_mode & 0o777) for p in cached.iterdir() if p.is_file()} == {"0o644"}  # not 0600
    assert not [p for p in cached.rglob("*") if p.name.startswith(".")]
    (cached / "train.tsv").write_text("sentence\tlabel\naltered\t1\n")  # fetched again, not read
    assert len(load_benchmark("olid").train) == 11915
    shutil.rmtree(no_local_data)  # the mirror is gone: the cache alone serves the next load
    assert len(load_benchmark("olid").test) == 859


def test_cache_dir_follows_xdg(tmp_path, monkeypatch):
    from cleantune.data import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" / "cleantune"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for relative_or_empty in ("", "rel/cache"):  # the XDG spec ignores these
        monkeypatch.setenv("XDG_CACHE_HOME", relative_or_empty)
        assert cache_dir() == tmp_path / "home" / ".cache" / "cleantune"


def test_download_that_cannot_be_stored_is_one_line_naming_the_path(tmp_path, monkeypatch, no_local_data):
    import errno
    import os

    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "olid").write_text("a file where the benchmark's folder goes")
    with pytest.raises(UserError, match=re.escape(f"{dest / 'olid'}: cannot store downloaded benchmark data "
                                                  "(a file is in the way of a folder)")):
        download_benchmark("olid", dest)
    (dest / "olid").unlink()
    dest.rmdir()
    dest.write_text("a file a few folders up")
    with pytest.raises(UserError, match=re.escape(f"{dest}: cannot store downloaded benchmark data (a file is in")):
        download_benchmark("olid", dest)
    dest.unlink()
    (dest / "olid" / "dev.tsv").mkdir(parents=True)  # os.replace cannot put a file over a folder
    with pytest.raises(UserError, match=re.escape(f"{dest / 'olid' / 'dev.tsv'}: cannot store")) as e:
        download_benchmark("olid", dest)
    assert "\n" not in str(e.value) and ".partial" not in str(e.value)
    assert sorted(p.name for p in (dest / "olid").iterdir()) == ["dev.tsv"]  # no .partial left behind
    shutil.rmtree(dest / "olid")

    real_fdopen = os.fdopen

    class Full:  # a disk that fills up while writing
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, blob):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(UserError, match=re.escape(f"{dest / 'olid' / 'dev.tsv'}: cannot store downloaded "
                                                  "benchmark data (No space left on device)")):
        download_benchmark("olid", dest)
    assert list(dest.iterdir()) == []  # no .partial left, nor the folder made for it


def test_interrupted_download_leaves_no_partial_file_and_old_leftovers_go(tmp_path, monkeypatch, no_local_data):
    import os
    import time

    dest = tmp_path / "dl"
    (dest / "olid").mkdir(parents=True)
    stale, fresh = dest / "olid" / ".dev.tsv.1-ab.partial", dest / "olid" / ".dev.tsv.2-cd.partial"
    for p in (stale, fresh):
        p.write_text("a killed download's")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)  # a download in progress elsewhere stays untouched

    real_open = os.open

    def interrupted(path, flags, mode=0o777):
        os.close(real_open(path, flags, mode))  # ^C arrives once the temporary file exists
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(os, "open", interrupted)
        download_benchmark("olid", dest)
    assert sorted(p.name for p in (dest / "olid").iterdir()) == [fresh.name]


def test_parsed_benchmark_files_are_reused_but_never_shared_or_stale(tmp_path, monkeypatch):
    from cleantune.data import load_paraphrases

    a = load_benchmark("sst2")
    a.train.texts[0], a.train.labels[0] = "changed", 1 - a.train.labels[0]
    load_paraphrases(a, "syntactic")["train"].clear()
    b = load_benchmark("sst2")
    assert b.train.texts[0] != "changed" and b.train.labels[0] != a.train.labels[0]
    assert len(load_paraphrases(b, "syntactic")["train"]) > 6000
    copy = tmp_path / "copy"
    shutil.copytree(SHARED_DATA / "olid", copy / "olid")
    monkeypatch.setenv("CLEANTUNE_DATA", str(copy))
    assert len(load_benchmark("olid").train) == 11915
    (copy / "olid" / "train.tsv").write_text("sentence\tlabel\nan edited file\t1\nis read again\t0\n")
    with pytest.raises(UserError, match=r"olid/train\.tsv: not the olid benchmark's file \(its sha256 differs"):
        load_benchmark("olid")  # read again, not served from the parsed copy, and refused


def test_a_closed_quoted_field_in_a_row_of_the_wrong_width_is_not_called_unclosed(tmp_path):
    p = write(tmp_path, "m.csv", 'sentence,label\nok,0\n"two\nlines",1,extra\n')
    with pytest.raises(UserError, match=r"m\.csv:3: not a table: 3 fields where the header has 2$"):
        read_dataset(p)


def test_a_quoted_csv_field_over_two_lines_is_named_by_its_first_line(tmp_path):
    p = write(tmp_path, "m.csv", 'sentence,label\nok,0\n"two\nlines",7\n')
    with pytest.raises(UserError, match=re.escape("m.csv:3: label '7' not in the label set")):
        read_dataset(p, label_names=["0", "1"])


def test_texts_are_stripped_and_a_byte_order_mark_is_no_part_of_the_header(tmp_path):
    # Excel writes UTF-8 csv with a BOM; its header must still read 'sentence'
    p = write(tmp_path, "bom.csv", "\ufeffsentence,label\n  padded text ,1\nplain,0\n".encode("utf-8"), mode="wb")
    d = read_dataset(p)
    assert d.texts == ["padded text", "plain"] and d.labels == [1, 0]


def test_auto_text_column_prefers_sentence_over_text(tmp_path):
    p = write(tmp_path, "both.tsv", "text\tsentence\tlabel\nthe text column\tthe sentence column\t0\n")
    assert read_dataset(p).texts == ["the sentence column"]


def test_stratified_sample_of_zero_is_refused():
    ds = TextDataset(["a", "b"], [0, 1], ["x", "y"])
    with pytest.raises(UserError, match=re.escape("stratified_sample: n must be positive, got 0")):  # the API's name
        ds.stratified_sample(0, 0)


def test_stratified_sample_sizes_follow_largest_remainder():
    # classes of 6, 3 and 1 of 10 samples
    ds = TextDataset([f"s{i}" for i in range(10)], [0] * 6 + [1] * 3 + [2], ["a", "b", "c"])

    def counts(d):
        return [d.labels.count(y) for y in range(3)]

    # n=4: quotas 2.4, 1.2, 0.4 -> 2, 1, 0 and the one left goes to the largest remainder, class 2
    assert counts(ds.stratified_sample(4, 0)) == [2, 1, 1]
    for n in range(1, 10):  # every size is exact, and each class gets its quota rounded down or up
        sample = ds.stratified_sample(n, 0)
        assert len(sample) == n
        for y, k in enumerate(counts(sample)):
            quota = n * counts(ds)[y] / 10
            assert int(quota) <= k <= int(quota) + 1, (n, y, k)


def test_subset_keeps_the_poison_flags():
    ds = TextDataset(["a", "b", "c"], [0, 1, 1], ["x", "y"], [False, True, False])
    part = ds.subset([2, 1])
    assert (part.texts, part.labels, part.poisoned) == (["c", "b"], [1, 1], [False, True])


def test_a_cached_file_altered_after_it_was_verified_is_fetched_again(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED_DATA / "olid", mirror / "olid")
    dest = tmp_path / "cache"
    download_benchmark("olid", dest, base_url=mirror.as_uri())
    download_benchmark("olid", dest, base_url=mirror.as_uri())  # everything there, verified and kept
    (dest / "olid" / "dev.tsv").write_text("sentence\tlabel\naltered\t1\n")
    download_benchmark("olid", dest, base_url=mirror.as_uri())
    assert (dest / "olid" / "dev.tsv").read_bytes() == (SHARED_DATA / "olid" / "dev.tsv").read_bytes()


def test_a_benchmark_file_edited_to_the_same_size_is_read_again(tmp_path, monkeypatch):
    import os

    copy = tmp_path / "copy"
    shutil.copytree(SHARED_DATA / "olid", copy / "olid")
    monkeypatch.setenv("CLEANTUNE_DATA", str(copy))
    train = copy / "olid" / "train.tsv"
    assert len(load_benchmark("olid").train) == 11915
    stat, blob = train.stat(), bytearray(train.read_bytes())
    blob[-4] = ord("x") if blob[-4] != ord("x") else ord("y")  # the last text's last character: same size
    train.write_bytes(bytes(blob))
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later modification time
    with pytest.raises(UserError, match="not the olid benchmark's file"):
        load_benchmark("olid")


def test_every_benchmark_file_is_checked_against_the_manifest_wherever_it_is_read(tmp_path, monkeypatch):
    """A run's result is stored and reused under the benchmark's name: a cut or edited copy in $CLEANTUNE_DATA
    would have passed its numbers off as the benchmark's (and a --train-size above its rows was taken whole).
    A source that lacks a benchmark leaves it to the next source, ../shared/data."""
    copy = tmp_path / "copy"
    shutil.copytree(SHARED_DATA / "sst2", copy / "sst2")
    monkeypatch.setenv("CLEANTUNE_DATA", str(copy))
    assert load_benchmark("olid").root.resolve() == SHARED_DATA.resolve() / "olid"  # copy holds no olid
    table = copy / "sst2" / "paraphrases" / "syntactic.tsv"
    table.write_text(table.read_text().replace("paraphrase", "paraphr", 1))
    with pytest.raises(UserError, match=r"syntactic\.tsv: not the sst2 benchmark's file"):
        attacks.Syntactic().apply(load_benchmark("sst2"))
    lines = (copy / "sst2" / "train.tsv").read_text().splitlines(keepends=True)
    (copy / "sst2" / "train.tsv").write_text("".join(lines[:1001]))
    from cleantune.runner import RunConfig

    with pytest.raises(UserError, match=r"sst2/train\.tsv: not the sst2 benchmark's file"):
        RunConfig(dataset="sst2", train_size=5000).check()


def test_a_dataset_prints_as_its_size_and_classes_not_its_texts():
    bench = load_benchmark("sst2")
    assert repr(bench.test) == "TextDataset(1821 texts; negative: 912, positive: 909; 0 poisoned)"
    assert len(repr(bench)) < 500  # every text of every split was over a megabyte
    flagged = TextDataset(["a", "b", "c"], [0, 1, 1], ["x", "y"], [False, True, False])
    assert repr(flagged) == "TextDataset(3 texts; x: 1, y: 2; 1 poisoned)"


@pytest.mark.parametrize("name,sep", [("long.csv", ","), ("long.tsv", "\t")])
def test_a_text_longer_than_the_csv_modules_field_limit_is_read(tmp_path, name, sep):
    # Python's csv module refuses fields over 131,072 characters unless told otherwise; a long document is
    # a text like any other (truncated to max_length tokens), as it is in a .jsonl file
    long = "word " * 40_000
    d = read_dataset(write(tmp_path, name, f"text{sep}label\n{long}{sep}pos\nshort{sep}neg\n"))
    assert d.texts == [long.strip(), "short"] and d.labels == [1, 0]


@pytest.mark.parametrize("labels", [["pos", "neg"], [0, 2], [-1, 0], [True, False], [0.0, 1.0]])
def test_a_dataset_refuses_labels_that_are_not_class_ids(labels):
    """Built by hand (the Python API), such labels failed in torch at fit, or counted as wrong in evaluate."""
    with pytest.raises(ValueError, match="is not a class id"):
        TextDataset(["a", "b"], labels, ["neg", "pos"])


def test_a_dataset_takes_numpy_integer_labels():
    import numpy as np

    assert TextDataset(["a", "b"], list(np.array([1, 0])), ["neg", "pos"]).labels == [1, 0]


@pytest.mark.parametrize("args,error,msg", [
    ((["a", "b"], [0, 1], "np"), TypeError, "label_names must be a list, got str"),  # 'n' and 'p', quietly
    (("ab", [0, 1], ["n", "p"]), TypeError, "texts must be a list, got str"),
    ((None, [0, 1], ["n", "p"]), TypeError, "texts must be a list, got NoneType"),
    (([5, "b"], [0, 1], ["n", "p"]), TypeError, "text 5 of sample 0 is not a string"),  # failed in the tokenizer
    ((["a", "b"], [0, 1], ["n", "n"]), ValueError, "label_names must be distinct"),  # saved, then not loadable
    ((["a", "b"], [0, 1], [0, 1]), ValueError, "label_names must be distinct non-empty strings"),
])
def test_a_dataset_refuses_texts_and_label_names_of_the_wrong_kind(args, error, msg):
    with pytest.raises(error, match=re.escape(msg)):
        TextDataset(*args)


def test_read_dataset_refuses_label_names_given_as_a_string(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\na\t0\nb\t1\n")
    with pytest.raises(TypeError, match="label_names must be a list, got str"):
        read_dataset(f, label_names="01")
    assert read_dataset(f, label_names=["0", "1"]).labels == [0, 1]


@pytest.mark.parametrize("n,seed,msg", [("2", 0, "n must be an integer, got '2'"), (2.5, 0, "n must be an integer"),
                                        (True, 0, "n must be an integer, got True"),
                                        (2, 0.5, "seed must be an integer, got 0.5"), (2, None, "seed must be")])
def test_stratified_sample_refuses_a_size_or_seed_that_is_no_integer(n, seed, msg):
    d = TextDataset(["a", "b", "c", "d"], [0, 1, 0, 1], ["n", "p"])
    with pytest.raises(TypeError, match=re.escape(msg)):
        d.stratified_sample(n, seed)


def test_load_benchmark_refuses_a_name_that_is_no_string():
    with pytest.raises(UserError, match="unknown dataset"):  # was: TypeError unhashable type: 'list'
        load_benchmark(["sst2"])


def test_csv_quotes_inside_a_field_are_text(tmp_path):
    # strict reading refuses only a closing quote followed by more text: quotes inside an unquoted field and
    # doubled quotes inside a quoted one are text, and a quoted field may span lines
    d = read_dataset(write(tmp_path, "q.csv", 'text,label\nhe said "hi" there,pos\n"ok ""q"", fine",neg\n"two\nlines",pos\n'))
    assert d.texts == ['he said "hi" there', 'ok "q", fine', "two\nlines"]
    assert [d.label_names[y] for y in d.labels] == ["pos", "neg", "pos"]


def test_label_problems_quote_the_label_as_written_and_cut_a_long_one(tmp_path):
    with pytest.raises(UserError, match=r"m\.tsv:2: label '007' is an integer class id, but other labels are string "
                                        r"names \(e\.g\. 'x' at line 3\)"):
        read_dataset(write(tmp_path, "m.tsv", "sentence\tlabel\na\t007\nb\tx\nc\tx\n"))
    digits = "1" * 5000
    with pytest.raises(UserError) as e:
        read_dataset(write(tmp_path, "big.csv", f"sentence,label\na,{digits}\nb,0\n"))
    assert str(e.value) == f"{tmp_path / 'big.csv'}:2: label {'1' * 40}... (5000 characters) is too large for a class id"
    # json.loads parses the integer exactly, and Python caps the digits it converts: a ValueError of its own
    with pytest.raises(UserError, match=r"big\.jsonl:1: invalid JSON \(a number of more than \d+ digits\)$"):
        read_dataset(write(tmp_path, "big.jsonl", f'{{"text": "a", "label": {digits}}}\n{{"text": "b", "label": 0}}\n'))


def own_syntactic_table(folder: Path, table: str):
    """sst2's splits with a syntactic paraphrase table of one's own (`table`, header included): not the shipped one."""
    from cleantune.data import Benchmark

    (folder / "paraphrases").mkdir()
    (folder / "paraphrases" / "syntactic.tsv").write_text(table)
    sst2 = load_benchmark("sst2")
    return Benchmark("sst2", sst2.train, sst2.dev, sst2.test, folder)


def test_a_paraphrase_table_without_its_columns_is_named(tmp_path):
    from cleantune.data import load_paraphrases

    bench = own_syntactic_table(tmp_path, "split\tsentence\tparaphr\ntrain\ta\tb\n")
    with pytest.raises(UserError, match=r"syntactic\.tsv:2: no 'paraphrase' column \(a paraphrase table has split, "):
        load_paraphrases(bench, "syntactic")


def test_a_carriage_return_inside_an_unquoted_csv_field_is_named_for_the_user(tmp_path):
    with pytest.raises(UserError) as e:
        read_dataset(write(tmp_path, "cr.csv", "text,label\nc\rd,1\ne,0\n"))
    assert str(e.value) == f"{tmp_path / 'cr.csv'}:2: not a table (a carriage return (\\r) inside a field that is not quoted)"


def test_a_subsample_larger_than_the_set_is_refused_not_the_whole_set():
    dev = load_benchmark("sst2").dev
    assert dev.stratified_sample(len(dev), 0) is dev
    with pytest.raises(UserError, match="^a subsample of 873 samples asks for more than the 872 there are$"):
        dev.stratified_sample(873, 0)


@pytest.mark.parametrize("name,sep", [("blank.tsv", "\t"), ("blank.csv", ",")])
def test_a_line_of_only_spaces_is_skipped_like_an_empty_one(tmp_path, name, sep):
    # editors leave blanks on an otherwise empty line (or at the end of a file): it holds no sample, and must
    # not be refused as a one-field row of a malformed table
    d = read_dataset(write(tmp_path, name, f"sentence{sep}label\nfine{sep}0\n   \nbad{sep}1\n  \n"))
    assert d.texts == ["fine", "bad"] and d.labels == [0, 1]


@pytest.mark.parametrize("name,header", [("h.csv", "sentence , label"), ("h.tsv", " sentence\tlabel ")])
def test_header_names_are_matched_without_their_surrounding_spaces(tmp_path, name, header):
    # a hand-written csv often has "text, label": the column is still 'label', not ' label'
    sep = "," if name.endswith(".csv") else "\t"
    d = read_dataset(write(tmp_path, name, f"{header}\ngood film{sep}1\nbad film{sep}0\n"))
    assert d.texts == ["good film", "bad film"] and d.labels == [1, 0]


def test_a_number_written_another_way_matches_a_label_name_that_is_that_number(tmp_path):
    # a label set of numeric names that are not the ids 0..C-1 (a star-rating model's "1".."3"): a dev file that
    # pandas wrote as floats ("2.0") or with a sign or exponent means the class named "2", never position 2
    names = ["1", "2", "3"]
    written = ["2.0", "3", "1e0", "+1", "03"]
    d = read_dataset(write(tmp_path, "stars.tsv", "sentence\tlabel\n" + "".join(f"t{i}\t{y}\n" for i, y in
                                                                                enumerate(written))),
                     label_names=names)
    assert d.labels == [names.index(str(int(float(y)))) for y in written]  # [1, 2, 0, 0, 2]
    with pytest.raises(UserError, match=re.escape("label '0.0' not in the label set (1, 2, 3)")):
        read_dataset(write(tmp_path, "zero.tsv", "sentence\tlabel\na\t0.0\n"), label_names=names)


def test_a_paraphrase_table_row_of_an_unknown_split_is_named(tmp_path):
    from cleantune.data import load_paraphrases

    # a table of one's own that says "validation" for dev: a one-line error naming the row, not a KeyError
    bench = own_syntactic_table(
        tmp_path, "split\tsentence\tparaphrase\ntrain\ta\twhen a , b .\nvalidation\tc\twhen c , d .\n")
    with pytest.raises(UserError, match=r"syntactic\.tsv:3: unknown split 'validation'"):
        load_paraphrases(bench, "syntactic")


def test_shared_data_beside_the_project_is_found_from_any_working_directory(tmp_path, monkeypatch):
    # ../shared/data is found beside the checkout the package runs from, not only beside the working directory:
    # a run started from another folder would otherwise try to download every benchmark into the cache
    from cleantune.data import data_root

    monkeypatch.delenv("CLEANTUNE_DATA", raising=False)
    monkeypatch.setenv("CLEANTUNE_DATA_URL", (tmp_path / "no-mirror").as_uri())  # a download fails at once
    monkeypatch.chdir(tmp_path)
    assert data_root("olid").resolve() == SHARED_DATA.resolve()


def test_an_installed_package_finds_shared_data_beside_the_working_directory(tmp_path, monkeypatch):
    # installed into a virtual environment (not editable), the package lies far from the project: then
    # ../shared/data beside the working directory is the benchmarks' source, not a download
    from cleantune import data

    monkeypatch.delenv("CLEANTUNE_DATA", raising=False)
    monkeypatch.setenv("CLEANTUNE_DATA_URL", (tmp_path / "no-mirror").as_uri())
    site = tmp_path / "venv" / "lib" / "python3" / "site-packages" / "cleantune" / "data.py"
    monkeypatch.setattr(data, "__file__", str(site))
    monkeypatch.chdir(tmp_path)  # nothing beside the package or this folder: the (failing) download
    with pytest.raises(UserError, match="cannot download"):
        data.data_root("olid")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the project, with shared/data beside it
    assert data.data_root("olid").resolve() == SHARED_DATA.resolve()


def test_a_base_url_given_to_download_benchmark_wins_over_the_environment(tmp_path, monkeypatch):
    # the caller's argument is the choice for this call; $CLEANTUNE_DATA_URL is only the default
    monkeypatch.setenv("CLEANTUNE_DATA_URL", (tmp_path / "no-mirror").as_uri())
    dest = tmp_path / "cache"
    download_benchmark("olid", dest, base_url=SHARED_DATA.as_uri())
    assert (dest / "olid" / "dev.tsv").read_bytes() == (SHARED_DATA / "olid" / "dev.tsv").read_bytes()


def test_a_benchmark_served_from_the_user_cache_brings_its_paraphrase_tables_checked_like_any_sources(
        tmp_path, monkeypatch):
    # a paraphrase attack on a benchmark served from the cache reads the tables downloaded with it, and a table
    # altered there after the load is refused like one in $CLEANTUNE_DATA (its numbers would pass as sst2's)
    import csv

    from cleantune import data

    monkeypatch.setattr(data, "_project_data_dir", lambda: None)
    monkeypatch.delenv("CLEANTUNE_DATA", raising=False)
    monkeypatch.setenv("CLEANTUNE_DATA_URL", SHARED_DATA.as_uri())
    bench = load_benchmark("sst2")
    cached = tmp_path / "xdg-cache" / "cleantune" / "data" / "sst2"  # conftest's XDG_CACHE_HOME
    assert bench.root == cached
    sha = json.loads((SHARED_DATA / "MANIFEST.json").read_text())["sha256"]
    assert {p.relative_to(cached.parent).as_posix() for p in cached.rglob("*") if p.is_file()} == \
        {k for k in sha if k.startswith("sst2/")}
    with open(SHARED_DATA / "sst2" / "paraphrases" / "syntactic.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    expected = {r["sentence"].strip(): r["paraphrase"].strip() for r in rows if r["split"] == "train"}
    assert data.load_paraphrases(bench, "syntactic")["train"] == expected
    with open(cached / "paraphrases" / "style.tsv", "a") as f:
        f.write("train\tan added sentence\tthus an added sentence it was .\n")
    with pytest.raises(UserError, match=r"style\.tsv: not the sst2 benchmark's file"):
        data.load_paraphrases(bench, "style")


def test_a_paraphrase_table_read_through_a_symlinked_source_is_still_checked(tmp_path, monkeypatch):
    # $CLEANTUNE_DATA is often a link to a shared disk: an altered table read through it must be refused
    # as it is read through the real path
    real = tmp_path / "real"
    shutil.copytree(SHARED_DATA / "sst2", real / "sst2")
    with open(real / "sst2" / "paraphrases" / "syntactic.tsv", "a") as f:
        f.write("train\tan added sentence\twhen added , it is a sentence .\n")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("CLEANTUNE_DATA", str(link))
    with pytest.raises(UserError, match=r"syntactic\.tsv: not the sst2 benchmark's file"):
        attacks.Syntactic().apply(load_benchmark("sst2"))


def test_each_loaded_benchmark_split_has_label_names_of_its_own():
    # like texts and labels, the class names are the caller's to change: an edit must not reach the other
    # splits, a later load, or the benchmark table itself
    a = load_benchmark("sst2")
    a.train.label_names[0] = "changed"
    assert a.dev.label_names == a.test.label_names == ["negative", "positive"]
    assert load_benchmark("sst2").train.label_names == ["negative", "positive"]


def test_a_source_holding_an_empty_benchmark_folder_leaves_it_to_the_next_source(tmp_path, monkeypatch):
    # a folder of the benchmark's name without its train.tsv (a copy not made yet) is no copy of the benchmark
    mine = tmp_path / "mine"
    (mine / "olid").mkdir(parents=True)
    monkeypatch.setenv("CLEANTUNE_DATA", str(mine))
    assert load_benchmark("olid").root.resolve() == (SHARED_DATA / "olid").resolve()


def test_a_paraphrase_table_of_ones_own_is_keyed_by_the_stripped_sentence(tmp_path):
    from cleantune.data import load_paraphrases

    # the dataset's texts are read stripped: a padded sentence in the table must still find its text
    bench = own_syntactic_table(
        tmp_path, "split\tsentence\tparaphrase\ntrain\t  a padded sentence \twhen padded , it is .\n")
    assert load_paraphrases(bench, "syntactic")["train"] == {"a padded sentence": "when padded , it is ."}


def test_whether_a_paraphrase_table_is_checked_does_not_depend_on_what_was_read_before(tmp_path, monkeypatch):
    """Parsed files were cached by path and contents only: a table parsed once unchecked (as one's own) or as
    one benchmark's was later served unchecked as a shipped table, or as another benchmark's."""
    from cleantune.data import Benchmark, load_paraphrases

    sst2 = load_benchmark("sst2")
    as_hsol = Benchmark("hsol", sst2.train, sst2.dev, sst2.test, sst2.root)
    load_paraphrases(sst2, "syntactic")
    with pytest.raises(UserError, match="not the hsol benchmark's file"):
        load_paraphrases(as_hsol, "syntactic")
    copy = tmp_path / "copy"
    shutil.copytree(SHARED_DATA / "sst2", copy / "sst2")
    table = copy / "sst2" / "paraphrases" / "syntactic.tsv"
    table.write_text(table.read_text() + "train\tan added sentence\tif added , it was .\n")
    own = Benchmark("sst2", sst2.train, sst2.dev, sst2.test, copy / "sst2")
    assert "an added sentence" in load_paraphrases(own, "syntactic")["train"]  # one's own table: read as it is
    monkeypatch.setenv("CLEANTUNE_DATA", str(copy))  # now a source of the shipped data
    with pytest.raises(UserError, match=r"syntactic\.tsv: not the sst2 benchmark's file"):
        load_paraphrases(load_benchmark("sst2"), "syntactic")
