"""Executing distillation plans."""
