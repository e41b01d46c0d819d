"""Model families: one folder per family (config dataclasses, TrainTask(s), generator, CLI options)."""
