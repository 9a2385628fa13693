"""`moectl profile`: where a training step's time goes (`run`), from profiler events attributed to
the engine's stages (`attribution`), with the expert backends side by side (`backends`) and the
device's peaks (`measure`, which training's MFU uses too)."""
