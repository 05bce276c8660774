"""Train and evaluate a jaxrec model.

  python experiments/train.py --config=experiments/configs/dlrm_synthetic.py --workdir=/tmp/run
"""

import json
import os
import sys

from absl import app, flags

# Configs may build on each other (`from experiments.configs import dlrm_synthetic`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ml_collections import config_flags

from jaxrec.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where metrics (and later checkpoints) go")


def main(argv):
  del argv
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
