"""Evaluation: metrics (:mod:`taskmllm.eval.metrics`) and the report writer (:mod:`taskmllm.eval.report`).

Import the submodules directly; this package imports nothing heavy on its own.
"""
