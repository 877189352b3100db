"""Attention distillation: the capture record a teacher's attention call leaves behind, and the
replay policy (budgets, eviction, sampling, rate limits) that decides what the trainers see; the
training of one layer's student on those captures (loss, trainer, readiness, OOM ladder) and the
plan that says which teacher run captures which layers, steps and queries, on which worker.

Pure: tensors and small typed records only, no files and no Ray (those are `runner/`).
"""
