"""Watching the sensors: what normal looks like per sensor, and findings when it changes.

Pure: fed messages, refusals and time by the broker (agent/broker/watching.py),
never reading a clock or a socket itself.

- `baseline.py`: one sensor's learned behaviour, in a few hundred bytes, with
  constant work per message: its interval and payload size (robust running
  estimates on a log scale), the methods and paths it uses, the hours it is
  active, a burst bucket, refusal counts, the addresses it speaks from.
- `findings.py`: what broke which baseline, with a score and the evidence.
- `detector.py`: the baselines of all sensors; findings out of messages,
  refusals and the passing of time (silent sensors).
"""
