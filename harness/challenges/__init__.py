"""Challenge profiles (what a submission looks like and how it is scored), described as data: see profile.py."""

from harness.challenges.profile import DEFAULT, ChallengeProfile, load_profile, shipped_names

__all__ = ["DEFAULT", "ChallengeProfile", "load_profile", "shipped_names"]
