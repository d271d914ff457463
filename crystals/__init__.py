"""Crystal domain objects; imports nothing else of ours (rewards/ and evaluation/ build on it).

text (the paper's bulk text format, CIF in and out), prompts (the A.4 generation prompt), data (MP-20
splits), validity (structural and compositional checks), sample (``Sample``: one generation for one
prompt), guard (cells a potential may be given), matching (``structure_key``, novelty against training
structures), potentials (CHGNet, SevenNet, UMA as models / ASE calculators, with their energy scales),
hull (the MP-20 convex hull and ``EnergyToHull``; data in hull_data/).
"""
