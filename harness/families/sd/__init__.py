"""The Stable Diffusion 1.x/2.x family: `harness train sd`, `harness generate` on its runs, `harness models info sd`,
`harness models make-tiny sd`. Networks and methods live in models/sd/ (no harness imports there)."""
