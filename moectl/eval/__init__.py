"""Evaluating trained models: validation loss and routing over held-out tokens."""
