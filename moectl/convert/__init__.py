"""Conversion: Hugging Face export (`export`) and import (`importer`), dense-to-MoE upcycling
(`upcycle`); each family's config and tensor maps live in `families` (one module per family), and
the generated modeling code of other models is moectl's engine made flat by `flatten`."""
