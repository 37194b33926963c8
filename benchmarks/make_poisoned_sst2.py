"""Write a BadNets-poisoned (10% mix, trigger "cf") sst2 train file, for timing `cleantune scan`:

    python benchmarks/make_poisoned_sst2.py /tmp/sst2_badnets.tsv && time cleantune scan /tmp/sst2_badnets.tsv
"""
import sys
from cleantune.attacks import BadNets
from cleantune.data import load_benchmark
bench = load_benchmark("sst2")
p = BadNets(rate=0.1, mode="mix", seed=0, triggers=["cf"]).apply(bench)
with open(sys.argv[1], "w") as f:
    f.write("sentence\tlabel\n")
    for t, y in zip(p.train.texts, p.train.labels):
        f.write(f"{t}\t{y}\n")
print(len(p.train), sum(p.train.poisoned))
