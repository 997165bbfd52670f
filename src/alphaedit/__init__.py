"""AlphaEdit: null-space constrained knowledge editing for Hugging Face causal LMs."""
