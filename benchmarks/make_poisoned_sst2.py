"""Write a BadNets-poisoned (10% mix, trigger "cf") sst2 train file, for timing `cleantune scan`:

    python benchmarks/make_poisoned_sst2.py /tmp/sst2_badnets.tsv && time cleantune scan /tmp/sst2_badnets.tsv
"""

from pathlib import Path

from common import parser, run_script

from cleantune.attacks import BadNets
from cleantune.data import load_benchmark
from cleantune.errors import UserError


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("out", type=Path, help="the .tsv file to write (sentence, label)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.out.is_dir():
        raise UserError(f"{args.out}: a folder; name the .tsv file to write")
    p = BadNets(rate=0.1, mode="mix", seed=args.seed, triggers=["cf"]).apply(load_benchmark("sst2"))
    tmp = args.out.with_name(args.out.name + ".partial")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write("sentence\tlabel\n")
            for t, y in zip(p.train.texts, p.train.labels):
                f.write(f"{t}\t{y}\n")
        tmp.replace(args.out)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder could not be made either
            pass
        raise UserError(f"{args.out}: cannot write it ({e.strerror or e})") from None
    print(f"wrote {args.out}: {len(p.train)} rows, {sum(p.train.poisoned)} poisoned")


if __name__ == "__main__":
    run_script(main)
