"""`python -m harness ...` (also what `accelerate launch -m harness ...` runs in every process)."""

from harness.cli import main

if __name__ == "__main__":
    main()
