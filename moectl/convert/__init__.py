"""Conversion: Hugging Face export (`export`) and import (`importer`), dense-to-MoE upcycling
(`upcycle`); the per-family config and tensor maps live in `families`."""
