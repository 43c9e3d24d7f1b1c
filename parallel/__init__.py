"""The parallelism runtime: layers, collectives and schedules, device-agnostic (CPU+gloo, CUDA+NCCL).

Model files build their linear layers, embeddings and expert dispatch from here; at parallel
size 1 every piece is the ordinary single-process computation.
"""
