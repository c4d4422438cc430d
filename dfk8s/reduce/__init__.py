"""The reduce stage: assemble result.jsonl, and reopen failed rows for a retry."""
