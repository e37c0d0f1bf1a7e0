"""Client set-up (`regcache setup TOOL`, scripts/setup-TOOL): the standard library only, since the
wrappers run on nodes without regcache's venv (checked by the layer contract)."""
