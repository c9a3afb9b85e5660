"""The offline tiny world: procedural data, a tiny LlamaGen VQ + GPT teacher, an evaluator network.

`ddcore.tiny.world.prepare_tiny_world` builds it, `load_tiny_world` loads it; see docs/tiny-world.md.
"""
