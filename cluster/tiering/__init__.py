"""Tiering: the policy (tiers, rules, holds, retention), the plan it makes from the
catalog, and (to come) the movers that carry it out and the capacity forecast."""
