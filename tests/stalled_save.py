"""The command line with its first model save stalled halfway, for the kill test of tests/test_checkpoint.py:

    python -m tests.stalled_save SENTINEL crystal-grpo-args...

The first tokenizer save (RUN/initial_model for `--model tiny`: model weights first, then the tokenizer)
touches SENTINEL and sleeps instead, so the test's SIGKILL lands where the issue's did: a model folder with
config.json and weights but no tokenizer. A save in place left exactly that as RUN/initial_model, which every
rerun trusted and crashed on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from cli import app


def main() -> None:
    sentinel, args = Path(sys.argv[1]), sys.argv[2:]

    def stalled_save(self, *args, **kwargs):
        sentinel.touch()
        time.sleep(600)  # killed here by the test

    PreTrainedTokenizerFast.save_pretrained = stalled_save  # the class of train_bpe_tokenizer's tokenizers
    app(args)


if __name__ == "__main__":
    main()
