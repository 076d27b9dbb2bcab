"""Side-by-side benchmarks of qwen3_mlx against mlx-lm (python -m benchmarks.decode)."""
