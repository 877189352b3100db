"""Attention distillation: the capture record a teacher's attention call leaves behind, and the
replay policy (budgets, eviction, sampling, rate limits) that decides what the trainers see.

Pure: tensors and small typed records only, no files and no Ray (those are `runner/replay`).
"""
