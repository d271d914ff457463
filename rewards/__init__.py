"""Rewards for crystal-text GRPO: the reward protocol and its adapters over ``crystals`` (grpo and evaluation
never import this package).

base (RewardOutput, Reward, FunctionReward, CrystalTextReward: the trainer's RewardFn), penalties (the gate),
potential (guarded/cached/batched MLIP energies, PotentialReward, EnergyReward), chgnet_energy (paper's
-E_tot), ehull (-E_hull on ``crystals.hull``), ase_calculator (any ASE calculator: SevenNet, UMA), diversity
(duplicates, novelty), composite (weighted sums), registry (resolve_reward / available_rewards).
"""
