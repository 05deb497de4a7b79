"""The broker's policy: least privilege, deny by default (docs/broker.md, 'Policy').

model.py parses and checks a policy file (messages name the profile, rule and
key); decide.py makes one decision for one message: allowed, by which rule, to
which upstream path, or denied and why. Both are pure: the rate state and the
clock are arguments.
"""
