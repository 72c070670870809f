"""Checkpoints: loading one in diffusers layout, local or by Hub id (checkpoint, hub), and making
them here: the tiny random-weight one (tiny) and the real-width one (synthetic)."""
