"""Model weights: a Hugging Face cache filled once (``dfk8s model pull``) and listed."""
