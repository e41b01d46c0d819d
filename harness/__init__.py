"""Submission harness for ImageCLEFmed MEDVQA-GI 2024 text-to-image (subtask 1).

Pipeline stages, one module each: data -> split -> dataset -> train (msdm / kandinsky) -> generate -> score ->
leaderboard -> package. `models/` holds the pure nn.Modules and loaders; nothing there imports this package.
"""

__version__ = "0.1.0"
