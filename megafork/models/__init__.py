"""Model families megafork trains (Qwen3 today)."""
