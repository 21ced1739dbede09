"""Freeze and guard inside other trainers: a Lightning callback and a Hugging Face
``TrainerCallback``. Each imports its framework only when used."""
