"""Money: the dated price table and estimate, usage from responses, the --max-cost budget."""
