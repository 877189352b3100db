"""Attention students: linear-time approximations of a transformer layer's softmax attention.

One student per layer, pure PyTorch: a 2-D local window softmax (the exact, safe base), a kernel
regression branch and a landmark softmax branch mixed in by bounded per-token gates, and a sigma/cfg
conditioner. Routes hand a layer's attention call to the teacher, a student or a capture callback.
docs/attention.md describes the design.
"""
