"""On-device runtime: tokenizer, chat template and decode loop. Imports neither torch nor transformers."""
