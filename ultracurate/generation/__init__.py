"""Candidate generation: the loop (`loop.py`), the two behaviours (`behaviour.py`),
Prompt-to-Prompt attention processors (`attention.py`) and the sampled parameters and
schedules (`params.py`). Seeds are planned in SQL (sql/queries/generate.sql)."""

from .behaviour import BEHAVIOURS, COMPAT, CallDropped
from .loop import (Pair, PairImages, Trace, euler_ancestral_step, generate_compat,
                   generate_method, run_pairs)
from .params import sample_compat, sample_method, schedule

__all__ = ["COMPAT", "BEHAVIOURS", "CallDropped", "Pair", "PairImages", "Trace",
           "euler_ancestral_step", "generate_compat", "generate_method", "run_pairs",
           "sample_compat", "sample_method", "schedule"]
