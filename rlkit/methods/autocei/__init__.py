"""Auto-CEI: Automatic Curriculum Expert Iteration (arXiv 2410.07627). See ``docs/methods/autocei.md``.

- :mod:`.core`: the pure pieces (IDK detection, the length-curriculum reward, the curriculum's initialisation,
  Boltzmann resampling, the objective f and the hill-climb on c1).
"""
