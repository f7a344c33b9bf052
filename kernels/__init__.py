"""Fast-weight ops (DeltaNet delta rule, LaCT SwiGLU): math only, no Megatron."""
