"""`hotswap demo`: a small RL loop in which a trainer improves a policy that hotswap serves live."""
