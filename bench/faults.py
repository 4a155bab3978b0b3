"""Reliability bench: kill -9 rounds against a live `segsearch serve` (see
`segsearch.testing.faults` for what a round does and what is checked).

Usage: python bench/faults.py [--rounds 12] [--seed 0] [--writers 2] [--work-dir DIR]
"""
from segsearch.testing.faults import main

if __name__ == "__main__":
    main()
