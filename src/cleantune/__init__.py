"""cleantune: train clean language models from backdoor-poisoned datasets."""

__version__ = "0.1.0"

from .data import Benchmark, TextDataset, load_benchmark, read_dataset  # noqa: E402
from .errors import UserError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .models import Classifier  # noqa: E402
from . import attacks, defenses  # noqa: E402

__all__ = ["Benchmark", "TextDataset", "load_benchmark", "read_dataset", "UserError", "evaluate", "Classifier",
           "attacks", "defenses", "__version__"]
