"""e2h-min: a minimal PPO/GRPO trainer with the E2H easy-to-hard curriculum."""
