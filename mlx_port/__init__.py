"""MLX port of LiteWhisper (installed as lite_whisper.mlx_port)."""
