"""Compiler passes: each a plain function from one explicit value (see monomod.ir) to the next."""
