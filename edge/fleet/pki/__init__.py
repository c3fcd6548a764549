"""The fleet's identities: its CA (``ca``: device, gateway, broker and operator certificates, the command key) and the
registry of enrolled devices with the broker access rules that follow from it (``registry``)."""
