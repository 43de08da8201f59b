"""Stage-two data: sources (text, pairs, instructions, t2i), templates, recipe mixing, packing, collation."""
