"""Rewards for crystal-text GRPO (built on ``crystals``; grpo never imports this package).

base (Sample, RewardOutput, Reward, FunctionReward, CrystalTextReward: the trainer's RewardFn),
penalties (the gate), potential (guarded/cached/batched MLIP energies, PotentialReward, EnergyReward),
chgnet_energy (paper's -E_tot), hull (MP-20 hull + MLIP energy -> E_hull), ehull (-E_hull),
ase_calculator (any ASE calculator: SevenNet, UMA), diversity (duplicates, novelty), composite (weighted
sums), registry (resolve_reward / available_rewards).
"""
