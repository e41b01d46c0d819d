"""Blind realism rating by clinicians (`harness rate make` / `harness rate summarize`).

- `harness.rating.study`: sample images per source (runs + real validation images as a control), balanced over
  caption strata, shuffle them with a seed, and write a self-contained rating page (`index.html`) and the key that
  maps its neutral ids back to sources (`key.json`, kept apart from the page).
- `harness.rating.analysis`: read the raters' exported CSVs strictly, compute per source and stratum the mean
  Likert score with a bootstrap interval, the answer distribution, visual-Turing-test accuracy with its interval and
  a test against 50 %, Krippendorff's alpha between raters; write the summary, a bar chart, each run's
  `reader_study.json` and the leaderboard's "Reader study" table.
- `page.html`: the rating page template (plain HTML/CSS/JS, no external resources).
"""
