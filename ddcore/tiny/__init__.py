"""The offline tiny worlds' shared pieces: procedural data (`data`), the judge network
(`evaluator`), the training-loop scaffolding (`training`) and the resumable part-by-part build
(`builder`). Each family's world lives with the family: `ddcore.teachers.llamagen.tiny_world`,
`ddcore.teachers.var.tiny_world`; see docs/tiny-world.md.
"""
