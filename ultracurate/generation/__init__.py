"""Candidate generation: the loop (`loop.py`), Prompt-to-Prompt attention processors
(`attention.py`) and the sampled parameters, seeds and schedules (`params.py`)."""

from .loop import COMPAT, Pair, PairImages, Trace, generate_compat, generate_method, run_pairs
from .params import BEHAVIOURS, candidate_seed, sample_compat, sample_method, schedule

__all__ = ["COMPAT", "BEHAVIOURS", "Pair", "PairImages", "Trace", "generate_compat",
           "generate_method", "run_pairs", "candidate_seed", "sample_compat", "sample_method",
           "schedule"]
