"""The operator wing: commands an operator runs. May import anything."""
