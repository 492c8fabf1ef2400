"""Distillation: a student sized for the device, trained on the teacher's outputs."""
