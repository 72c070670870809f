"""What the model is: one declarative spec per component (specs), the video sizes it serves (sizes)
and the three Helios variants (variants)."""
