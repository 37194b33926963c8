"""Datasets: the in-memory type, readers for user files (tsv/csv/jsonl), and the benchmark registry."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import numbers
import os
import random
import re
import secrets
import sys
import time
import urllib.request
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from .errors import UserError
from .store import file_sha256, make_parents, remove_empty

BENCHMARKS = {
    # name: (number of classes, class names, paraphrase attacks shipped)
    "sst2": (2, ["negative", "positive"], ("syntactic", "style")),
    "hsol": (2, ["clean", "toxic"], ("syntactic", "style")),
    "agnews": (4, ["world", "sports", "business", "sci/tech"], ("style",)),
    "olid": (2, ["not-offensive", "offensive"], ()),
}
SPLITS = ("train", "dev", "test")
# The normalised benchmark layout is mirrored at this base URL; CLEANTUNE_DATA_URL overrides it
# (a file:// URL works, which is how the download path is tested offline).
DEFAULT_DATA_URL = "https://raw.githubusercontent.com/cleantune/cleantune-data/main"
_MANIFEST = Path(__file__).with_name("MANIFEST.json")


@dataclass
class TextDataset:
    """Texts with integer labels. `poisoned` is ground truth for detection metrics; defenses never read it."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    poisoned: list[bool] = field(default_factory=list)

    def __post_init__(self):
        # a str would be iterated letter by letter, as texts one character long or as one-letter class names
        # a dict would give its keys, a set no order; numpy arrays and pandas columns (indexed by their labels,
        # not positions) are taken as the lists they hold
        for what in ("texts", "labels", "label_names", "poisoned"):
            value = getattr(self, what)
            if isinstance(value, (str, bytes, Mapping, Set)) or not hasattr(value, "__len__"):
                raise TypeError(f"TextDataset: {what} must be a list, got {type(value).__name__}")
            setattr(self, what, value.tolist() if hasattr(value, "tolist") else list(value))
        if not self.poisoned:
            self.poisoned = [False] * len(self.texts)
        if not (len(self.texts) == len(self.labels) == len(self.poisoned)):
            raise ValueError("texts, labels and poisoned must have the same length")
        # a non-string text fails in the tokenizer at fit or predict, with its error about pretokenized input
        bad = next((i for i, t in enumerate(self.texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"text {self.texts[bad]!r} of sample {bad} is not a string")
        # matched by name to a model's and a dev set's classes, and saved with the model: a repeated or non-string
        # name trains a model that from_pretrained refuses, or fails in evaluate
        odd = next((n for n in self.label_names if not isinstance(n, str) or not n), None)
        if odd is not None or len(set(self.label_names)) < len(self.label_names):
            raise ValueError(f"label_names must be distinct non-empty strings, got {list(self.label_names)!r}")
        # a label that is no class id ("pos", 2 of two classes) would fail deep in training, or quietly count as
        # a wrong prediction in evaluate; numpy's integers pass (a pandas column read with list())
        bad = next((i for i, y in enumerate(self.labels) if isinstance(y, bool) or not isinstance(y, numbers.Integral)
                    or not 0 <= y < len(self.label_names)), None)
        if bad is not None:
            raise ValueError(f"label {self.labels[bad]!r} of sample {bad} is not a class id "
                             f"(0..{len(self.label_names) - 1}, for {', '.join(self.label_names)})")

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:  # the dataclass's would print every text (1 MB for SST-2's splits)
        counts = ", ".join(f"{n}: {self.labels.count(i)}" for i, n in enumerate(self.label_names))
        return f"TextDataset({len(self)} texts; {counts}; {sum(self.poisoned)} poisoned)"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices) -> TextDataset:
        indices = list(indices)
        return TextDataset(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            self.label_names,
            [self.poisoned[i] for i in indices],
        )

    def without_flags(self) -> TextDataset:
        """The view a defense gets: same samples, poison flags hidden."""
        return TextDataset(list(self.texts), list(self.labels), self.label_names)

    def stratified_sample(self, n: int, seed: int) -> TextDataset:
        """A seeded, label-stratified subsample of n samples (label proportions kept, rounding by largest remainder)."""
        for what, v in (("n", n), ("seed", seed)):  # a float n fails in random.sample; True is quietly 1
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"stratified_sample: {what} must be an integer, got {v!r}")
        if n <= 0:
            raise UserError(f"stratified_sample: n must be positive, got {n}")  # run checks --train-size itself
        if n > len(self):  # returned whole, a script's 2N-step run or its --test-size was cut short without a word
            raise UserError(f"a subsample of {n} samples asks for more than the {len(self)} there are")
        if n == len(self):
            return self
        rng = random.Random(f"stratify-{seed}")
        by_label: dict[int, list[int]] = {}
        for i, y in enumerate(self.labels):
            by_label.setdefault(y, []).append(i)
        quotas = {y: n * len(ix) / len(self) for y, ix in by_label.items()}
        take = {y: int(q) for y, q in quotas.items()}
        for y in sorted(quotas, key=lambda y: quotas[y] - take[y], reverse=True)[: n - sum(take.values())]:
            take[y] += 1
        chosen = []
        for y in sorted(by_label):
            chosen += rng.sample(by_label[y], take[y])
        return self.subset(sorted(chosen))


@dataclass
class Benchmark:
    name: str
    train: TextDataset
    dev: TextDataset
    test: TextDataset
    root: Path | None = None  # where paraphrase tables live

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names


# ---------------------------------------------------------------- reading files


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 text (byte {e.start})") from None


def text_problem(t: str) -> str | None:
    """Why `t` cannot be a sample's text (read_dataset's, fit's and predict's check), or None."""
    if not any(c.isprintable() and not c.isspace() for c in t):  # a tokenizer drops formats and controls too
        return "empty text" + (" (only invisible characters)" if t.strip() else "")
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes
        t.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"invalid text (character {e.start + 1} is a lone surrogate)"
    return None


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a .tsv, .csv or .jsonl file with a header (tsv/csv)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():  # before its name's suffix: "unsupported file type (none)" misleads for a folder
        raise UserError(f"{path}: a folder, not a data file (.tsv, .csv or .jsonl)")
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use .tsv, .csv or .jsonl")
    text = _decode(path)
    if "\x00" in text:
        raise UserError(f"{path}:{text[:text.index(chr(0))].count(chr(10)) + 1}: not a table (binary content)")
    if suffix == ".jsonl":
        out = []
        # "\n" only: splitlines() also breaks at U+2028/U+2029/U+0085, which JSON strings may hold raw
        # (json.dumps(..., ensure_ascii=False) writes them so); a "\r" left by CRLF is JSON whitespace
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            except _DuplicateKey as e:  # json keeps the last one without a word: which text or label was meant?
                raise UserError(f"{path}:{n}: key '{e}' appears twice in one object") from None
            except RecursionError:
                raise UserError(f"{path}:{n}: invalid JSON (nested too deeply)") from None
            except ValueError:  # Python's cap on the digits of an integer, which json.loads parses exactly
                raise UserError(f"{path}:{n}: invalid JSON (a number of more than {sys.get_int_max_str_digits()} "
                                "digits)") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{n}: each line must be a JSON object")
            out.append((n, rec))
        return out
    # The benchmark TSVs hold no quoting (see the data README); csv files use standard quoting. The csv module
    # refuses a field over 131,072 characters by default ("not a table"), which a long document is: no field
    # is longer than the file
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    # strict: a closing quote followed by more text (`"a fine film,pos` whose quote the next line's `"a dull
    # film",neg` closes) is an error; the lenient reader glued the two rows into one sample without a word
    reader = csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",",
                        quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL, strict=suffix != ".tsv")
    rows, last = [], 0
    try:
        for row in reader:  # numbered by the line each row starts on (a quoted field may span lines)
            rows.append((last + 1, row))
            last = reader.line_num
    except csv.Error as e:
        if "unexpected end of data" in str(e):  # strict reading: a quote still open at the end of the file
            raise UserError(f"{path}:{last + 1}: not a table: a quoted field opened on this line is never closed") from None
        spans = f"; the row began on line {last + 1}, so a quote may be left open there" if reader.line_num > last + 1 else ""
        why = str(e)
        if why.startswith("new-line character seen in unquoted field"):  # the module's advice is for the programmer
            why = "a carriage return (\\r) inside a field that is not quoted"
        raise UserError(f"{path}:{reader.line_num}: not a table ({why}{spans})") from None
    if not rows or not any(c.strip() for c in rows[0][1]):
        raise UserError(f"{path}:1: empty file or missing header")
    header = [c.strip() for c in rows[0][1]]
    twice = next((c for i, c in enumerate(header) if c and c in header[:i]), None)  # '' : trailing commas
    if twice is not None:
        raise UserError(f"{path}:{rows[0][0]}: column '{twice}' appears twice in the header")
    out = []
    for n, row in rows[1:]:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise UserError(f"{path}:{n}: not a table: {len(row)} fields where the header has {len(header)}")
        out.append((n, dict(zip(header, row))))
    return out


def read_dataset(path: str | Path, text_column: str = "auto", label_column: str = "label",
                 label_names: list[str] | None = None) -> TextDataset:
    """Read a labelled file. Integer labels are class ids; string labels map to ids.

    A number is the same label in every format: `1`, `"1"`, `1.0` and `1e0` are all the integer 1 (pandas
    writes an integer column holding a gap as floats); a non-integral number such as 2.5 is refused, since
    it is a regression target or a typo, not a class. Only ASCII digits make a number.
    Without `label_names`, integer labels 0..max become their own names and string labels are sorted; one
    file cannot mix the two. With `label_names` given (a model's or a benchmark's label set) every label must
    be one of those names, or, where the names are the ids "0".."C-1", an integer id below C.
    """
    if isinstance(label_names, (str, bytes)):  # "01" would be the classes '0' and '1', quietly
        raise TypeError(f"read_dataset: label_names must be a list, got {type(label_names).__name__}")
    path = Path(path)
    records = read_records(path)
    if not records:
        raise UserError(f"{path}: no samples")
    first_line, first = records[0]
    if path.suffix.lower() != ".jsonl":  # a table's columns are its header's
        first_line = 1
    auto = text_column == "auto"
    if auto:
        text_column = next((c for c in ("sentence", "text") if c in first), "sentence")
    if text_column == label_column:
        raise UserError(f"{path}: the text and label columns are both '{text_column}'")
    for col in (text_column, label_column):
        if col not in first:
            name = "'sentence' or 'text'" if auto and col == text_column else f"'{col}'"
            raise UserError(f"{path}:{first_line}: missing column {name} (found: {', '.join(map(str, first))})")
    texts, raw_labels = [], []
    for n, rec in records:
        if text_column not in rec or label_column not in rec:
            raise UserError(f"{path}:{n}: missing column '{text_column if text_column not in rec else label_column}'")
        t, y = rec[text_column], rec[label_column]
        if not isinstance(t, str):
            raise UserError(f"{path}:{n}: text {json.dumps(t)[:40]} is not a string")
        problem = text_problem(t)
        if problem:
            raise UserError(f"{path}:{n}: {problem}")
        if y is None or (isinstance(y, str) and not y.strip()):
            raise UserError(f"{path}:{n}: missing label")
        if isinstance(y, bool) or not isinstance(y, (int, float, str)):
            raise UserError(f"{path}:{n}: label {json.dumps(y)} is neither an integer class id nor a string")
        texts.append(t.strip())
        raw_labels.append((n, y.strip() if isinstance(y, str) else y))
    if label_names is None:
        label_names = _infer_label_names(raw_labels, path)
    labels = [_label_id(y, label_names, path, n) for n, y in raw_labels]
    return TextDataset(texts, labels, list(label_names))


# ASCII digits only: str.isdigit() also accepts '²', which int() then rejects.
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
_MAX_ID = 10**18  # far beyond any class count


def target_id(value, label_names: list[str], data: str) -> int:
    """--target as `run`, `eval` and `scan` take it: one of DATA's label names, else a class id in DATA's
    numbering (a number as files' labels are: 1.0 is the id 1)."""
    if str(value) in label_names:  # a name first, as labels in files are read
        return label_names.index(str(value))
    v = label_value(str(value).strip(), "--target")
    if isinstance(v, int):
        return v
    raise UserError(f"--target {value} is neither a class id nor a label of {data} ({', '.join(label_names)})")


def shorten(text: str, limit: int = 40) -> str:
    """A value quoted in a one-line message: its start, where it is long (a 5,000-digit label filled the screen)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def label_value(y, where: str) -> int | str:
    """A label as an integer class id, or as a string name (anything that is not a number); `where` names its
    place in errors ("file:line", or an option)."""
    if isinstance(y, int) and abs(y) < _MAX_ID:
        return y
    if isinstance(y, str) and not _DECIMAL.fullmatch(y):
        return y
    x = Decimal(y)  # exact, unlike float: '1.0000000000000001' is not the integer 1
    if x.is_finite() and x.adjusted() >= 18:  # before any arithmetic, which overflows on 1e999999999
        raise UserError(f"{where}: label {shorten(str(y))} is too large for a class id")
    if not x.is_finite() or x != x.to_integral_value():
        raise UserError(f"{where}: label {shorten(str(y))} is a number but not an integer class id "
                        f"(class labels are integer ids 0..C-1 or names)")
    return int(x)


def bare_ids(label_names: list[str]) -> bool:
    """Whether a label set is the bare ids 0..C-1 (transformers' default names LABEL_i for a model
    saved without names count too), so that integer labels may address it by position."""
    c = len(label_names)
    return label_names in ([str(i) for i in range(c)], [f"LABEL_{i}" for i in range(c)])


def _infer_label_names(labels: list[tuple[int, object]], path: Path) -> list[str]:
    """Integer labels are class ids 0..C-1, every one of them present (a gap, as in 0 and 5, means codes
    rather than ids, and would silently make empty classes); any other labels are names, sorted.
    A column mixing the two is refused: a stray name among ids would otherwise become an extra class."""
    values = [(n, label_value(y, f"{path}:{n}")) for n, y in labels]
    kinds = {"ids": [(n, v) for n, v in values if isinstance(v, int)],
             "names": [(n, v) for n, v in values if isinstance(v, str)]}
    if kinds["ids"] and kinds["names"]:
        # the rarer kind is the stray one; on a tie, the kind that shows up later
        odd = min(kinds, key=lambda k: (len(kinds[k]), -kinds[k][0][0]))
        other = "names" if odd == "ids" else "ids"
        written = dict(labels)  # quoted as in the file ('007', not the id 7)
        (n, _), (m, _) = kinds[odd][0], kinds[other][0]
        v, w = written[n], written[m]
        described = {"ids": "an integer class id", "names": "a string name"}
        raise UserError(f"{path}:{n}: label '{shorten(str(v))}' is {described[odd]}, but other labels are "
                        f"{'integer class ids' if other == 'ids' else 'string names'} (e.g. '{shorten(str(w))}' at "
                        f"line {m}): "
                        f"a label column holds either ids 0..C-1 or names, not both")
    if kinds["ids"]:
        first = {}
        for n, y in kinds["ids"]:
            first.setdefault(y, n)
        ids = sorted(first)
        if ids[0] < 0:
            raise UserError(f"{path}:{first[ids[0]]}: negative label {ids[0]}: integer labels must be class ids 0..C-1")
        if len(ids) != ids[-1] + 1:
            missing = next(i for i in range(ids[-1] + 1) if i not in first)
            raise UserError(f"{path}:{first[ids[-1]]}: label {ids[-1]}, but class {missing} never occurs: integer "
                            f"labels must be class ids 0..C-1 (write codes as strings, e.g. 'c{ids[-1]}')")
        return [str(i) for i in ids]
    return sorted({v for _, v in kinds["names"]})


def _label_id(y, label_names: list[str], path: Path, line: int) -> int:
    # The label as written first, so that a saved label set whose names look numeric (say '1.0') still
    # matches; a number is never taken as a position among names, which silently shifted classes.
    if str(y) in label_names:
        return label_names.index(str(y))
    v = label_value(y, f"{path}:{line}")
    if isinstance(v, int) and bare_ids(label_names):
        if 0 <= v < len(label_names):
            return v
    elif str(v) in label_names:
        return label_names.index(str(v))
    if isinstance(v, int) and not bare_ids(label_names):
        hint = "; integer labels address classes only when the label set is ids 0..C-1"
    elif not isinstance(v, int) and bare_ids(label_names):
        # a model trained on ids (or with transformers' LABEL_i) knows no names: its classes are its ids
        hint = f"; that label set is class ids, so write the labels as ids 0..{len(label_names) - 1}"
    else:
        hint = ""
    raise UserError(f"{path}:{line}: label '{shorten(str(y))}' not in the label set ({', '.join(label_names)}){hint}")


# ---------------------------------------------------------------- benchmark data


def _project_data_dir() -> Path | None:
    here = Path(__file__).resolve()
    for base in (here.parents[3] if len(here.parents) > 3 else None, Path.cwd().parent):
        if base is not None and (base / "shared" / "data" / "MANIFEST.json").is_file():
            return base / "shared" / "data"
    return None


def cache_dir() -> Path:
    from .store import xdg_dir

    return xdg_dir("XDG_CACHE_HOME", ".cache")


def _sources() -> list[Path]:
    """The read-only sources, in the order they are consulted for a benchmark."""
    sources = []
    env = os.environ.get("CLEANTUNE_DATA")
    if env:
        if not Path(env).is_dir():
            raise UserError(f"CLEANTUNE_DATA={env}: not a directory")
        sources.append(Path(env))
    local = _project_data_dir()
    return sources + ([local] if local is not None and local not in sources else [])


def data_root(name: str | None = None) -> Path:
    """The folder holding benchmark `name`: $CLEANTUNE_DATA, else ../shared/data beside the project, where it
    is there; else the user cache ($XDG_CACHE_HOME/cleantune/data, ~/.cache/... when unset), downloading what
    is missing or corrupt into it. The first two are only ever read: they may be shared or read-only.
    Without a name: the first source, else the cache."""
    sources = _sources()
    cache = cache_dir() / "data"
    if name is None:
        return sources[0] if sources else cache
    for root in sources:
        if (root / name / "train.tsv").is_file():
            return root
    download_benchmark(name, cache)  # verifies what the cache holds; fetches only missing or altered files
    return cache


def _manifest() -> dict:
    return json.loads(_MANIFEST.read_text())


def split_sizes(name: str) -> dict[str, int]:
    """A benchmark's split sizes from the shipped manifest, without reading the data."""
    return {k: v for k, v in _manifest()["rows"][name].items() if k in SPLITS}


_PARTIAL = ".partial"
_STALE_PARTIAL_S = 3600  # older partial files are a killed download's, never one in progress


def _write_verified(dest: Path, blob: bytes) -> None:
    """Write `dest` whole or not at all: into a `.partial` file beside it, renamed over it when complete,
    removed on any error or interrupt (what a killed process leaves, the next download there removes once it
    is an hour old)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{_PARTIAL}")
    try:
        # mode 0666 less the umask, as for any new file (NamedTemporaryFile's 0600 hid the data from others)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _remove_stale_partials(folder: Path) -> None:
    for p in folder.glob(f".*{_PARTIAL}"):
        try:
            if time.time() - p.stat().st_mtime > _STALE_PARTIAL_S:
                p.unlink()
        except OSError:
            pass


def download_benchmark(name: str, root: Path, base_url: str | None = None) -> None:
    """Fetch a benchmark's files into root, each verified against the shipped MANIFEST sha256; a file that
    is already there and matches is kept. A file is moved into place only once its hash matches, so a failed
    download leaves nothing half; a folder or file that cannot be written is a one-line UserError."""
    base_url = (base_url or os.environ.get("CLEANTUNE_DATA_URL") or DEFAULT_DATA_URL).rstrip("/")
    sha = _manifest()["sha256"]
    created: list[Path] = []  # folders made here: a download that fails leaves no empty cache folders behind
    try:
        for rel in sorted(k for k in sha if k.startswith(f"{name}/")):
            _download_file(root / rel, f"{base_url}/{rel}", sha[rel], created)
    except BaseException:
        remove_empty(created)  # only while empty: files verified before the failure stay for the next try
        raise


def _download_file(dest: Path, url: str, sha256: str, created: list[Path]) -> None:
    try:
        if dest.is_file() and _verified(dest, sha256):
            return
        created[:0] = make_parents(dest)  # before the download: a folder in the way fails fast
        _remove_stale_partials(dest.parent)
    except OSError as e:
        raise _store_error(e, dest) from None
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            blob = r.read()
    except Exception as e:  # urllib raises several unrelated types
        raise UserError(f"cannot download {url}: {e}") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != sha256:
        raise UserError(f"{url}: sha256 {got[:12]}... does not match MANIFEST.json ({sha256[:12]}...)")
    try:
        _write_verified(dest, blob)
    except OSError as e:
        raise _store_error(e, dest) from None


# (path, size, mtime) of cached files that matched their hash: a benchmark served from the cache is loaded
# once per sweep cell (RunConfig.check), and agnews alone is 17 MB to hash
_VERIFIED: set[tuple] = set()


def _verified(path: Path, sha256: str) -> bool:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, sha256)
    if key not in _VERIFIED:
        if file_sha256(path) != sha256:
            return False
        _VERIFIED.add(key)
    return True


def _store_error(e: OSError, dest: Path) -> UserError:
    # the path that failed (a file where a folder goes, say), but never the hidden .partial name: the user
    # knows the file being stored
    where = Path(e.filename) if e.filename and not str(e.filename).endswith(_PARTIAL) else dest
    if e.errno in (errno.EEXIST, errno.ENOTDIR):  # name the file itself, which may be a few folders up
        where = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), where)
        return UserError(f"{where}: cannot store downloaded benchmark data (a file is in the way of a folder)")
    return UserError(f"{where}: cannot store downloaded benchmark data ({e.strerror or e})")


def load_benchmark(name: str) -> Benchmark:
    """A benchmark by name (sst2, hsol, agnews, olid) with its train/dev/test splits."""
    if not isinstance(name, str) or name not in BENCHMARKS:  # a list is unhashable: a TypeError of the dict
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(BENCHMARKS)})")
    root = data_root(name) / name
    n, names, _ = BENCHMARKS[name]

    def read(path):
        ds = read_dataset(path, "sentence", "label", label_names=[str(i) for i in range(n)])
        return tuple(ds.texts), tuple(ds.labels)

    splits = {}
    for s in SPLITS:  # fresh lists each call: callers subsample and poison them in place
        texts, labels = _cached(root / f"{s}.tsv", read, f"{name}/{s}.tsv")
        splits[s] = TextDataset(list(texts), list(labels), list(names))
    return Benchmark(name, splits["train"], splits["dev"], splits["test"], root)


# Parsed benchmark files by path, size and modification time: every cell of a sweep is checked on its data
# before any trains (RunConfig.check), and a file is parsed once for all of them.
_PARSED: dict[tuple, object] = {}


def _cached(path: Path, read, checked_as: str | None):
    """`read(path)`, parsed once per contents, after checking the file against MANIFEST entry `checked_as`
    (None: not a shipped file). The entry is part of the key: a file parsed unchecked (as one's own table) or as
    another benchmark's file is checked when it is read as this shipped one."""
    try:
        st = path.stat()
    except OSError:
        return read(path)  # which names the file in its error
    key = (str(path), st.st_size, st.st_mtime_ns, checked_as)
    if key not in _PARSED:
        for old in [k for k in _PARSED if k[0] == key[0]]:  # an edited file's earlier contents, or another check's
            del _PARSED[old]
        if checked_as is not None:
            _check_shipped(path, checked_as)
        _PARSED[key] = read(path)
    return _PARSED[key]


def check_paraphrases(dataset: str, attack: str) -> None:
    if dataset not in BENCHMARKS:  # a Benchmark built by hand: its name is no key of the tables (a KeyError)
        raise UserError(f"attack '{attack}' needs the stored paraphrases of a benchmark ({', '.join(BENCHMARKS)}), "
                        f"and dataset '{dataset}' is none")
    if attack not in BENCHMARKS[dataset][2]:
        raise UserError(f"attack '{attack}' needs paraphrases, and dataset '{dataset}' ships none for it")


def load_paraphrases(bench: Benchmark, attack: str) -> dict[str, dict[str, str]]:
    """{split: {original sentence: trigger-bearing paraphrase}} for a paraphrase attack."""
    check_paraphrases(bench.name, attack)
    root = bench.root if bench.root is not None else data_root(bench.name) / bench.name  # a Benchmark built by hand
    # the shipped tables wherever benchmark data is read from; a Benchmark built by hand may name its own
    shipped = root.resolve().parent in {p.resolve() for p in (*_sources(), cache_dir() / "data")}

    rel = f"{bench.name}/paraphrases/{attack}.tsv" if shipped else None
    table = _cached(root / "paraphrases" / f"{attack}.tsv", _read_paraphrases, rel)
    return {s: dict(t) for s, t in table.items()}  # a copy: the cached table serves every later call


def _check_shipped(path: Path, rel: str) -> None:
    """A benchmark file must be the one MANIFEST.json names, wherever it is read from: a run stores its result
    under the benchmark's name, and a later run reuses it, so an edited or stale copy would pass its numbers off
    as the benchmark's. Checked when the file is parsed (once per contents: _cached)."""
    try:
        matches = _verified(path, _manifest()["sha256"][rel])
    except OSError:
        return  # read_dataset names the file in its own error
    if not matches:
        raise UserError(f"{path}: not the {rel.split('/')[0]} benchmark's file (its sha256 differs from the shipped "
                        "MANIFEST.json): restore it, or train on your own data with `cleantune train`")


def _read_paraphrases(path: Path) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {s: {} for s in SPLITS}
    for n, rec in read_records(path):
        missing = [c for c in ("split", "sentence", "paraphrase") if c not in rec]
        if missing:
            raise UserError(f"{path}:{n}: no '{missing[0]}' column (a paraphrase table has split, sentence, paraphrase)")
        if rec.get("split") not in table:
            raise UserError(f"{path}:{n}: unknown split '{rec.get('split')}'")
        table[rec["split"]][rec["sentence"].strip()] = rec["paraphrase"].strip()
    return table
