"""Where the cells of a sweep run: in their own local processes pinned to devices (local.py), or as SLURM jobs
through submitit (slurm.py); each cell process runs `harness sweep-cell SWEEP_DIR CELL` (cell.py), which rebuilds
the cell's config from sweep.json, the one truth every process writes under its lock (state.py)."""
