"""Measurement: bench, long streams, the scale report and each step's needs (scale), process memory
(memory) and /proc (procfs)."""
