"""PEFT methods, one folder each in PEFT's config / layer / model layout, plus the machinery they share."""
