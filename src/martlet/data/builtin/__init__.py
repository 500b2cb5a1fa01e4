"""The built-in datasets: JSONL files (self_cognition, general) and generators (stdlib only, deterministic):
`math_gen` (arithmetic word problems), `pref_math` (math preference pairs), `pref_identity` (identity pairs)."""
